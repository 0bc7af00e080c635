#!/usr/bin/env bash
# hf-paged serve vs vLLM's OpenAI server on the default model, streamed chat requests, interleaved rounds.
#   VLLM_PYTHON=/path/to/vllm-venv/bin/python bash benchmarks/serve_vs_vllm.sh OUT_DIR [DTYPE] [ROUNDS] [REQUESTS] [CONCURRENCY] [MAX_TOKENS]
# Both servers start once and stay up; during each load the other server's processes are suspended
# (SIGSTOP), so an idle server's background threads cannot take CPU from the measured one. Each round
# runs set A then set B (benchmarks/chat_requests.py) against hf_paged then vLLM, with
# `serve_load.py --route chat --prompts A|B` (tokens counted from the usage chunk, greedy, EOS on).
# Server CPU time (process tree, user + system) is read before and after each load. One JSON per load
# in OUT_DIR, plus a summary line each on stdout. Same engine limits on both: 64 sequences, 2048 batched
# tokens, 1 GiB of KV cache, prefix caching on (both defaults).
set -u
OUT="${1:?usage: serve_vs_vllm.sh OUT_DIR [DTYPE] [ROUNDS] [REQUESTS] [CONCURRENCY] [MAX_TOKENS]}"
DT=${2:-bfloat16}; ROUNDS=${3:-3}; REQ=${4:-128}; CONC=${5:-32}; MT=${6:-128}
: "${VLLM_PYTHON:?set VLLM_PYTHON to the python of a venv with vLLM}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODEL=$($PY -c "from hf_paged.models import ensure_default_model; print(ensure_default_model())")
P1=${PORT_PAGED:-8961}; P2=${PORT_VLLM:-8962}
($PY -m hf_paged.server --dtype "$DT" --max-num-seqs 64 --max-batch-tokens 2048 --kv-memory 1GiB --no-ui \
    --port $P1 > "$OUT/server_paged.log" 2>&1) &
PP=$!
(VLLM_CPU_KVCACHE_SPACE=1 exec "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" --dtype "$DT" \
    --port $P2 --max-model-len 4096 --max-num-seqs 64 --max-num-batched-tokens 2048 --seed 0 \
    --served-model-name smollm2 > "$OUT/server_vllm.log" 2>&1) &
VP=$!
trap 'kill $PP $VP 2>/dev/null; sleep 3; kill -9 $PP $VP 2>/dev/null' EXIT
for i in $(seq 300); do
    kill -0 $PP 2>/dev/null && kill -0 $VP 2>/dev/null || { echo "a server died: see $OUT/server_*.log"; exit 1; }
    curl -sf localhost:$P1/health >/dev/null && curl -sf localhost:$P2/health >/dev/null && break
    sleep 1
done
echo "servers up after $i s"
tree() {  # tree PID cpu|STOP|CONT: CPU seconds of the process tree, or suspend / resume it
    $PY -c "
import psutil, sys
p = psutil.Process(int(sys.argv[1])); t = 0.0
for q in [p] + p.children(recursive=True):
    try:
        if sys.argv[2] == 'cpu':
            c = q.cpu_times(); t += c.user + c.system
        else:
            (q.suspend if sys.argv[2] == 'STOP' else q.resume)()
    except psutil.Error:
        pass
if sys.argv[2] == 'cpu':
    print(round(t, 2))" "$1" "$2"
}
for port in $P1 $P2; do  # warm-up
    $PY benchmarks/serve_load.py --url http://127.0.0.1:$port --route chat --prompts B --requests 16 \
        --concurrency 16 --max-new-tokens 16 --json > /dev/null 2>&1
done
for r in $(seq "$ROUNDS"); do
  for set in A B; do
    for sys in paged vllm; do
      if [ $sys = paged ]; then port=$P1; pid=$PP; other=$VP; else port=$P2; pid=$VP; other=$PP; fi
      f="$OUT/${DT}_${set}_${sys}_$r.json"
      tree $other STOP
      c0=$(tree $pid cpu)
      $PY benchmarks/serve_load.py --url http://127.0.0.1:$port --route chat --prompts $set --requests "$REQ" \
          --concurrency "$CONC" --max-new-tokens "$MT" --json > "$f" 2> "${f%.json}.err"
      c1=$(tree $pid cpu)
      tree $other CONT
      $PY - "$f" "$c0" "$c1" <<'PY'
import json, sys
path = sys.argv[1]
x = json.load(open(path))
cpu = float(sys.argv[3]) - float(sys.argv[2])
x["server_cpu_s"] = round(cpu, 2)
x["server_cpu_us_per_token"] = round(cpu / max(1, x["output_tokens"]) * 1e6, 1)
json.dump(x, open(path, "w"))
print(path.rsplit("/", 1)[-1], f"ok {x['ok']} errors {x['errors']} {x['tokens_per_s']} tok/s ({x['output_tokens']} "
      f"tokens) TTFT p50 {x['ttft_p50_ms']} ITL p50 {x['itl_p50_ms']} p99 {x['itl_p99_ms']} ms, server CPU "
      f"{x['server_cpu_us_per_token']} us/token", flush=True)
PY
    done
  done
done
