#!/usr/bin/env bash
# Prefix caching on a GPU: TTFT of a prefix-repetition workload (shared 2000-token prefixes,
# 100-token suffixes) with the cache off, on, and with a GPU tier too small to keep the prefixes so
# hits must come from the CPU tier (--swap-space), plus that small tier without the CPU tier.
#   bash benchmarks/prefix_gpu.sh CKPT_DIR [result_dir]
set -uo pipefail
ckpt=$1; out_dir=${2:-/tmp}; port=8322
n=${N:-128}; conc=${CONC:-4}; groups=${GROUPS_N:-16}
run() {  # name, then server flags
    local name=$1; shift
    python3 -m ernieserve serve "$ckpt" --port $port --host 127.0.0.1 --max-model-len 4096 --max-num-seqs 64 \
        --disable-log-requests "$@" > "$out_dir/server-$name.log" 2>&1 &
    local server=$!
    for _ in $(seq 1 180); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        kill -0 $server 2>/dev/null || { tail -20 "$out_dir/server-$name.log"; return 1; }
        sleep 1
    done
    echo "### $name: $*"
    grep -E "KV cache|host tier|swap" "$out_dir/server-$name.log" | sed 's/^/[server] /' | head -4
    # warm-up on other prefixes (seed 1): Triton compiles its prefill kernels on first use
    python3 -m ernieserve bench serve --backend openai --base-url "http://127.0.0.1:$port" --tokenizer "$ckpt" \
        --dataset-name prefix-repetition --prefix-repetition-prefix-len 2000 --prefix-repetition-suffix-len 100 \
        --prefix-repetition-num-prefixes 4 --prefix-repetition-output-len 16 --num-prompts 16 \
        --max-concurrency "$conc" --ignore-eos --seed 1 --disable-tqdm > /dev/null 2>&1
    python3 -m ernieserve bench serve --backend openai --base-url "http://127.0.0.1:$port" --tokenizer "$ckpt" \
        --dataset-name prefix-repetition --prefix-repetition-prefix-len 2000 --prefix-repetition-suffix-len 100 \
        --prefix-repetition-num-prefixes "$groups" --prefix-repetition-output-len 16 --num-prompts "$n" \
        --max-concurrency "$conc" --ignore-eos --percentile-metrics ttft,tpot,e2el --metric-percentiles 50,99 \
        --seed 0 --disable-tqdm 2>&1 | grep -E "Successful|duration|TTFT|Total Token"
    curl -s "http://127.0.0.1:$port/metrics" | grep -E "^ernieserve:(hit_req_rate|hit_token_rate|gpu_hit_token_rate|cpu_hit_token_rate|prefix_gpu_cache_token_num|prefix_cpu_cache_token_num) "
    kill -TERM $server; wait $server 2>/dev/null || true
}
# 2100-token prompts need 33 blocks of 64; 160 device blocks hold the 4 in flight and little else,
# while the 16 prefixes take 512 blocks (the CPU tier gets 2 GiB: ~1700 blocks of the 0.3B model)
run off --no-enable-prefix-caching
run on
run small-gpu-cpu-tier --num-gpu-blocks-override 160 --swap-space 2
run small-gpu-no-tier --num-gpu-blocks-override 160
