#!/usr/bin/env bash
# Serving benchmark on a GPU: starts our OpenAI server on a dummy checkpoint, waits until it is
# healthy, runs `ernieserve bench serve` against it, prints the server's own counters, stops it.
#   bash benchmarks/serve_gpu.sh CKPT_DIR [num_prompts] [concurrency] [in_len] [out_len] [result_dir]
set -euo pipefail
ckpt=$1; n=${2:-128}; conc=${3:-64}; in_len=${4:-1000}; out_len=${5:-1000}; out_dir=${6:-/tmp}
port=8321
python3 -m ernieserve serve "$ckpt" --port $port --host 127.0.0.1 --max-model-len 4096 --max-num-seqs 256 \
    --disable-log-requests > "$out_dir/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { tail -20 "$out_dir/server.log"; exit 1; }
    sleep 1
done
grep -E "KV cache|CUDA graphs|Engine ready" "$out_dir/server.log" | sed 's/^/[server] /' || true
python3 -m ernieserve bench serve --backend openai --base-url "http://127.0.0.1:$port" --tokenizer "$ckpt" \
    --dataset-name random --random-input-len "$in_len" --random-output-len "$out_len" --num-prompts "$n" \
    --max-concurrency "$conc" --ignore-eos --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 \
    --save-result --result-dir "$out_dir" --disable-tqdm
curl -s "http://127.0.0.1:$port/metrics" | grep -E "^ernieserve:(prompt_tokens_total|generation_tokens_total|num_requests)" || true
