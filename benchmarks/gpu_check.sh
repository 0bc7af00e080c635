#!/usr/bin/env bash
# GPU check of the Triton kernels, offline: usage  benchmarks/gpu_check.sh RESULTS_DIR [TOKENIZER_DIR]
#
# Expects torch, transformers and triton to be installed already; installs nothing. Runs from the
# repository root with PYTHONPATH=. so hf_paged needs no install. Every stage logs to its own file in
# RESULTS_DIR and the next stage runs even when one fails; stage exit codes go to status.txt.
# Time limits add up to 10 minutes. TOKENIZER_DIR (any local tokenizer folder, e.g. the default model's)
# enables stage 4.
#   1. tests/test_kernels.py compiled on CUDA (HF_PAGED_TEST_CUDA=1, bf16 included)  -> test_kernels.log
#   1b. tests/test_lora.py's Triton SGMV and engine tests on CUDA                    -> test_lora.log
#   2. benchmarks/kernels.py (decode/prefill vs SDPA, flex, torch reference)          -> kernels.{log,json}
#   3. benchmarks/e2e_gpu.py (random ~1B Llama, generate, plain vs wrapped)          -> e2e.{log,json}
#   4. benchmarks/pipeline_gpu.py (same model, 256 requests: PagedPipeline vs HF)    -> pipeline.{log,json}
set -u
set -x

RESULTS="${1:?usage: benchmarks/gpu_check.sh RESULTS_DIR}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
TOKENIZER="${2:-}"
[ -n "$TOKENIZER" ] && TOKENIZER="$(cd "$TOKENIZER" && pwd)"
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

# Compilation dominates the CUDA test run: spread it over workers when pytest-xdist is there.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
stage test_kernels 170 env -u TRITON_INTERPRET HF_PAGED_TEST_CUDA=1 HF_PAGED_BACKEND=triton \
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" "${XDIST[@]}" tests/test_kernels.py
stage test_lora 60 env -u TRITON_INTERPRET HF_PAGED_TEST_CUDA=1 \
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_lora.py -k "triton or cuda"
stage kernels 100 "$PY" benchmarks/kernels.py --no-flex --out "$RESULTS/kernels.json"
stage e2e 110 "$PY" benchmarks/e2e_gpu.py --out "$RESULTS/e2e.json"
if [ -n "$TOKENIZER" ]; then
    stage pipeline 160 "$PY" benchmarks/pipeline_gpu.py --tokenizer "$TOKENIZER" --out "$RESULTS/pipeline.json"
fi

cat "$STATUS"
