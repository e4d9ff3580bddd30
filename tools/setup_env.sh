#!/usr/bin/env bash
# Creates .venv in the repository root and installs everything the project needs.
# On a machine without an NVIDIA GPU it installs torch's CPU build (a bare `torch` requirement would pull a
# multi-GB CUDA build); DeepSpeed is installed without pre-built ops (DS_BUILD_OPS=0: no CUDA toolkit needed).
# Safe to re-run: an existing .venv is reused and pip skips what is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${PIP[@]}" install "torch==${TORCH_VERSION}"
    else
        # CPU build: a local CPU wheel where pip's find-links provide one, PyTorch's CPU index otherwise.
        LINKS="$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)"
        if [ -n "$LINKS" ] && ls "$LINKS"/torch-"${TORCH_VERSION}"+cpu-*.whl >/dev/null 2>&1; then
            "${PIP[@]}" install "torch==${TORCH_VERSION}"
        else
            "${PIP[@]}" install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
        fi
    fi
fi
DS_BUILD_OPS=0 "${PIP[@]}" install -r requirements-dev.txt
"${PIP[@]}" install --no-deps -e .
echo "environment ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
