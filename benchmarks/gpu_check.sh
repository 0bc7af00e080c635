#!/usr/bin/env bash
# GPU check of the Triton kernels, offline: usage  benchmarks/gpu_check.sh RESULTS_DIR [TOKENIZER_DIR]
#
# On the device machine:  PACK=$OUT/gpu_results.tgz bash benchmarks/gpu_check.sh /tmp/gpu
#
# Expects torch, transformers and triton to be installed already; installs nothing. Runs from the
# repository root with PYTHONPATH=. so hf_paged needs no install. Every stage logs to its own file in
# RESULTS_DIR and the next stage runs even when one fails; stage exit codes go to status.txt.
# Time: the default stages share TOTAL_S (460) seconds of wall clock from the script's start. Each stage
# is capped at its own limit and at what is left; the throughput stage gets all that is left (~70-100 s
# when every stage before it runs to its cap, more when they end early), and the sampler stage only what
# the throughput stage leaves, so the whole run ends inside an 8-minute device command. FULL=1 adds the older kernel / end-to-end stages (run them in a second command, with
# TOTAL_S raised). DRY_RUN=1 runs every stage on CPU (tests skip their CUDA cases, benchmarks take their
# --cpu-dry-run path): check it before a run.
# PACK=FILE.tgz: after every stage, RESULTS_DIR (less the Chrome traces) is packed into FILE.tgz and the
# traces into FILE_traces.tgz, so what finished comes back even if the command is killed (the device
# returns at most 8 files).
#   1. tests/test_kernels.py compiled on CUDA (HF_PAGED_TEST_CUDA=1, bf16 included)    -> test_kernels.log
#   2. CUDA engine tests: graphs + async scheduling vs the plain eager loop (fp32, bf16, preemption, n>1),
#      the device sampler's one copy per step, LoRA's Triton SGMV and engine tests    -> test_engine.log
#   3. benchmarks/prefill.py (8 x 1024 fresh prompt tokens, bf16: varlen vs paged vs plain SDPA) -> prefill.log
#   3b. benchmarks/profile_gpu.py (torch.profiler over 10 decode steps at 256 rows, graphs and eager)
#                                                     -> profile.log, profile/{profile,trace}_{graphs,eager}.*
#   4. benchmarks/throughput_gpu.py (nano-vllm's workload on Llama-3.2-1B / Qwen3-0.6B shapes: hf_paged
#      with and without CUDA graphs vs generate_batch vs padded generate; --budget-s: what is left)
#                                                                     -> throughput.log, gpu_throughput_<YYYY-MM-DD>.json
#   FULL=1:
#   5. benchmarks/kernels.py (decode/prefill vs SDPA, flex, torch reference)            -> kernels.{log,json}
#   6. benchmarks/e2e_gpu.py (random ~1B Llama, generate, plain vs wrapped)            -> e2e.{log,json}
#   7. benchmarks/pipeline_gpu.py (same model, 256 requests; needs TOKENIZER_DIR)      -> pipeline.{log,json}
# STAGES=a,b: only those stages (names as in status.txt), e.g. for the second command of a session, after a
# first run that passed: STAGES=throughput TOTAL_S=280 THROUGHPUT_ARGS="--systems hf_paged_eager,generate_batch,
# hf_static" gives the systems the first run's budget did not reach their own run.
set -u
set -x

RESULTS="${1:?usage: benchmarks/gpu_check.sh RESULTS_DIR}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
TOKENIZER="${2:-}"
[ -n "$TOKENIZER" ] && TOKENIZER="$(cd "$TOKENIZER" && pwd)"
PACK="${PACK:-}"
[ -n "$PACK" ] && PACK="$(cd "$(dirname "$PACK")" && pwd)/$(basename "$PACK")"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-460}"
STATUS="$RESULTS/status.txt"
: > "$STATUS"

pack() {  # RESULTS_DIR into $PACK (traces apart), written whole or not at all
    [ -n "$PACK" ] || return 0
    tar czf "$PACK.tmp" -C "$RESULTS" --exclude='trace_*.json' . && mv "$PACK.tmp" "$PACK"
    local traces="${PACK%.tgz}_traces.tgz"
    if ls "$RESULTS"/profile/trace_*.json > /dev/null 2>&1; then
        (cd "$RESULTS" && tar czf "$traces.tmp" profile/trace_*.json) && mv "$traces.tmp" "$traces"
    fi
}

left() {  # seconds of TOTAL_S still left, less a reserve for packing
    echo $((TOTAL_S - SECONDS - 8))
}

stage() {  # stage NAME SECONDS COMMAND... : run with a time limit (capped at what is left), log, record the exit code
    local name="$1" limit="$2"
    shift 2
    if [ -n "${STAGES:-}" ] && [[ ",$STAGES," != *",$name,"* ]]; then
        return
    fi
    local avail
    avail=$(left)
    [ "$avail" -lt "$limit" ] && limit=$avail
    if [ "$limit" -lt 10 ]; then
        echo "$name skipped: ${limit} s left of TOTAL_S=$TOTAL_S" >> "$STATUS"
        return
    fi
    local start=$SECONDS
    timeout -k 5 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start)) limit=$limit" >> "$STATUS"
    pack
}

{
    timeout 20 nvidia-smi
    timeout 60 "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
    git rev-parse HEAD
} > "$RESULTS/env.log" 2>&1
pack

# Compilation dominates the CUDA test run: spread it over workers when pytest-xdist is there. pytest-timeout
# (where installed) ends a hung test instead of the whole stage; -v names every test in the log.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
PYTEST=(-m pytest -v --durations=20 -p no:cacheprovider -o addopts="")
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 90)
DRY=()
CUDA_ENV=(env -u TRITON_INTERPRET HF_PAGED_TEST_CUDA=1)
if [ "${DRY_RUN:-0}" = 1 ]; then
    DRY=(--cpu-dry-run)
    CUDA_ENV=(env)
    XDIST=()
fi
stage test_kernels 110 "${CUDA_ENV[@]}" HF_PAGED_BACKEND=triton "$PY" "${PYTEST[@]}" "${XDIST[@]}" tests/test_kernels.py
stage test_engine 130 "${CUDA_ENV[@]}" "$PY" "${PYTEST[@]}" -rs \
    tests/test_graphs.py tests/test_device_sampler.py tests/test_varlen.py tests/test_lora.py -k "cuda or triton"
if [ "${DRY_RUN:-0}" = 1 ]; then
    stage prefill 40 "$PY" benchmarks/prefill.py --device cpu --prompts 1 --length 32 --rounds 1
else
    stage prefill 50 "$PY" benchmarks/prefill.py --device cuda --dtype bfloat16 --prompts 8 --length 1024
fi
stage profile 60 "$PY" benchmarks/profile_gpu.py "${DRY[@]}" --eager --steps 10 --out "$RESULTS/profile"
# The throughput benchmark gets what is left; its own budget ends it (JSON written) 25 s before the stage's limit.
T_LIMIT=$(left)
[ "${FULL:-0}" = 1 ] && [ "$T_LIMIT" -gt 155 ] && T_LIMIT=155  # leave time for the FULL stages
stage throughput "$T_LIMIT" "$PY" benchmarks/throughput_gpu.py "${DRY[@]}" --out "$RESULTS/gpu_throughput_$(date -u +%F).json" \
    --budget-s $((T_LIMIT - 25)) ${THROUGHPUT_ARGS:-}
# The device sampler by sampling setting, kernels on and off: only in what the throughput stage leaves.
stage sampler 20 "$PY" benchmarks/sampler_gpu.py "${DRY[@]}" --out "$RESULTS/sampler.json"
if [ "${FULL:-0}" = 1 ]; then
    stage kernels 100 "$PY" benchmarks/kernels.py --no-flex --out "$RESULTS/kernels.json"
    stage e2e 110 "$PY" benchmarks/e2e_gpu.py --out "$RESULTS/e2e.json"
    if [ -n "$TOKENIZER" ]; then
        stage pipeline 160 "$PY" benchmarks/pipeline_gpu.py --tokenizer "$TOKENIZER" --out "$RESULTS/pipeline.json"
    fi
fi

cat "$STATUS"
pack
