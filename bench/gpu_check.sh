#!/usr/bin/env bash
# The one-GPU check of issue 12, prepared to finish in under 8 minutes on one H200:
#   1. bf16 training steps of a ~350M LaMemo and Transformer-XL at N = M = 512 with the fused attention
#      (tokens/s, MFU against the GPU's dense bf16 peak, peak memory) and fused-vs-eager on the same weights;
#   2. the CUDA tests of the fused path (fp32 and bf16, forward and backward against eager);
#   3. (issue 26, bench/gpu_check_recompute.py) parallel.recompute none / attention / full: activations' peak
#      memory and step time at N = M = 512, and training steps of the pipeline engine with the fused attention.
# Results are appended to bench/RESULTS-gpu.md (or $1) together with the command.
#
#   bash bench/gpu_check.sh [RESULTS.md]          # PYTHON=... to choose the interpreter (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/RESULTS-gpu.md}
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device visible to $py (this check needs one GPU)" >&2
    exit 2
fi
{
    echo
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "    bash bench/gpu_check.sh $*"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'
} >> "$out"
timeout 330 "$py" bench/gpu_check.py --out "$out" --command "bash bench/gpu_check.sh $*"
echo >> "$out"
echo "CUDA tests of the fused path (tests/model/test_fused_attention.py -k cuda):" >> "$out"
set +e
timeout 120 "$py" -m pytest tests/model/test_fused_attention.py -k cuda -q -p no:cacheprovider 2>&1 \
    | tail -n 3 | sed 's/^/    /' >> "$out"
status=${PIPESTATUS[0]}
set -e

# ---- issue 26: selective recompute and the pipeline engine with the fused attention (about 2 minutes) -------
recompute_and_pipeline_checks() {
    local rc=0 gpus stages
    timeout 100 "$py" bench/gpu_check_recompute.py recompute --out "$out" || rc=$?
    # One process per stage; NCCL refuses two ranks on one GPU, so a one-GPU machine runs a single stage.
    gpus=$(nvidia-smi -L | wc -l)
    stages=$(( gpus >= 2 ? 2 : 1 ))
    timeout 100 "$py" -m torch.distributed.run --nproc-per-node="$stages" --master-addr=127.0.0.1 \
        --master-port="${PIPELINE_PORT:-29613}" bench/gpu_check_recompute.py pipeline --backend flex --out "$out" \
        || rc=$?
    return "$rc"
}
set +e
recompute_and_pipeline_checks
issue26_status=$?
set -e
[ "$status" -ne 0 ] || status=$issue26_status
# ---- end of issue 26's checks ----------------------------------------------------------------------------------
tail -n 40 "$out"
exit "$status"
