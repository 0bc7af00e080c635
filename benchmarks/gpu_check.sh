#!/usr/bin/env bash
# GPU check of the Triton kernels, offline: usage  benchmarks/gpu_check.sh RESULTS_DIR
#
# Expects torch, transformers and triton to be installed already; installs nothing. Runs from the
# repository root with PYTHONPATH=. so hf_paged needs no install. Every stage logs to its own file in
# RESULTS_DIR and the next stage runs even when one fails; stage exit codes go to status.txt.
# Time limits add up to 7.5 minutes.
#   1. tests/test_kernels.py compiled on CUDA (HF_PAGED_TEST_CUDA=1, bf16 included)  -> test_kernels.log
#   2. benchmarks/kernels.py (decode/prefill vs SDPA, flex, torch reference)          -> kernels.{log,json}
#   3. benchmarks/e2e_gpu.py (random ~1B Llama, generate, plain vs wrapped)          -> e2e.{log,json}
set -u
set -x

RESULTS="${1:?usage: benchmarks/gpu_check.sh RESULTS_DIR}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python}"
STATUS="$RESULTS/status.txt"
: > "$STATUS"

stage() {  # stage NAME SECONDS COMMAND... : run with a time limit, log, record the exit code
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" >> "$STATUS"
}

{
    nvidia-smi
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
    git rev-parse HEAD
} > "$RESULTS/env.log" 2>&1

stage test_kernels 180 env -u TRITON_INTERPRET HF_PAGED_TEST_CUDA=1 HF_PAGED_BACKEND=triton \
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py
stage kernels 120 "$PY" benchmarks/kernels.py --out "$RESULTS/kernels.json"
stage e2e 150 "$PY" benchmarks/e2e_gpu.py --out "$RESULTS/e2e.json"

cat "$STATUS"
