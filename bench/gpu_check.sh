#!/usr/bin/env bash
# The one-GPU check of issue 12, prepared to finish in under 8 minutes on one H200:
#   1. bf16 training steps of a ~350M LaMemo and Transformer-XL at N = M = 512 with the fused attention
#      (tokens/s, MFU against the GPU's dense bf16 peak, peak memory) and fused-vs-eager on the same weights;
#   2. the CUDA tests of the fused path (fp32 and bf16, forward and backward against eager);
#   3. the time a checkpoint save blocks training with and without run.async_save (issue 26, async_save_check);
#   4. (issue 26, bench/gpu_check_recompute.py) parallel.recompute none / attention / full: activations' peak
#      memory and step time at N = M = 512, and training steps of the pipeline engine with the fused attention.
# Results are appended to bench/RESULTS-gpu.md (or $1) together with the command.
#
#   bash bench/gpu_check.sh [RESULTS.md]          # PYTHON=... to choose the interpreter (default python3)
# The timeouts below add up to 480 s (210 + 90 + 80 + 60 + 40): the whole script stays under 8 minutes even
# when a part hangs; a part that runs out is reported by its own status, and the rest still runs.
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
set +e
timeout 210 "$py" bench/gpu_check.py --out "$out" --command "bash bench/gpu_check.sh $*"
first=$?
set -e
echo >> "$out"
echo "CUDA tests of the fused path (tests/model/test_fused_attention.py -k cuda):" >> "$out"
set +e
timeout 90 "$py" -m pytest tests/model/test_fused_attention.py -k cuda -q -p no:cacheprovider 2>&1 \
    | tail -n 3 | sed 's/^/    /' >> "$out"
status=${PIPESTATUS[0]}
set -e
[ "$first" -eq 0 ] || status=$first

# ---- issue 26 (branch issue-26a): asynchronous checkpoints -------------------------------------------------------
# The ~110M model of bench/bench_async_save.py on this GPU, fp32, a save every 2 steps: blocked time per save
# with run.async_save true and false (two short trainer runs, about 1-2 minutes).
async_save_check() {
    echo
    local args="--tensor 1 --pipeline 1 --device cuda --steps 9 --save-interval 2"
    echo "Checkpoint save on one GPU, blocked time per save (bench/bench_async_save.py $args):"
    # shellcheck disable=SC2086
    timeout 80 "$py" bench/bench_async_save.py $args 2>&1 | tail -n 3 | sed 's/^/    /'
}
set +e
async_save_check >> "$out"
set -e
# ---- end issue 26 (asynchronous checkpoints) ----------------------------------------------------------------------

# ---- issue 26: selective recompute and the pipeline engine with the fused attention (about 2 minutes) -------
recompute_and_pipeline_checks() {
    local rc=0 gpus stages
    timeout 60 "$py" bench/gpu_check_recompute.py recompute --out "$out" || rc=$?
    # One process per stage; NCCL refuses two ranks on one GPU, so a one-GPU machine runs a single stage.
    gpus=$(nvidia-smi -L | wc -l)
    stages=$(( gpus >= 2 ? 2 : 1 ))
    timeout 40 "$py" -m torch.distributed.run --nproc-per-node="$stages" --master-addr=127.0.0.1 \
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
