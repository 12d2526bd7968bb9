#!/usr/bin/env bash
# Tensor-parallel measurements on 2-4 GPUs, stage by stage, each under its own time limit (one
# device command is at most 10 minutes); logs and JSON results go to $OUT.
#   bash benchmarks/tp_gpu.sh tests|equal|latency|throughput|big ...
#
#   tests       tests/gpu/test_tp_gpu.py: TP=2 vs TP=1 on tiny checkpoints, eager and CUDA graphs
#   equal       ERNIE-4.5-21B-A3B (--load-format dummy: the same random model at every TP size, see
#               distributed/sharded_loading.py), greedy tokens of 8 prompts at TP=1, TP=2 and TP=2 with
#               expert parallelism (against TP=1 with the same flag); prints how many leading tokens
#               agree (bf16: rounding differs with the all-reduce order, so a late divergence on a
#               near-tie is possible; an early one is a bug)
#               (DTYPE=float32 runs the equal stage in fp32, where only the all-reduce's summation
#               order differs: the strict check on real shapes)
#   latency     21B-A3B batch-1 decode ms/step (`ernieserve bench latency`) at TP=1 and TP=2
#   throughput  21B-A3B offline throughput (`ernieserve bench throughput`) at TP=1 and TP=2
#   big         ERNIE-4.5-300B-A47B at TP=4 with --quantization wint4 (QUANT=wint8 for int8), one engine
#               (benchmarks/one_engine_bench.py): peak memory per GPU (nvidia-smi), weights per rank
#               (the engine's log), batch-1 decode ms/step against its floor, offline throughput
set -uo pipefail
out=${OUT:-/tmp/gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
filter() { grep -v -E "it/s\]|B/s\]|s/it\]|graph/s\]|shard/s\]"; }
ck21=/tmp/ckpt-21b; ck300=/tmp/ckpt-300b
[ -f $ck21/config.json ] || python3 -m ernieserve make-dummy --preset ernie-4.5-21b-a3b $ck21 >/dev/null
ngpu=$(nvidia-smi -L | wc -l)
common=(--load-format dummy --dtype bfloat16 --max-model-len 2048)
# the engine's own startup lines that say where memory went, per rank
engine_lines="Parallel layout|Weights per rank|KV cache:|Captured|Loaded .*rank"

latency() {  # latency TP [extra flags...]
  local tp=$1; shift
  echo "--- bench latency, TP=$tp $*"
  timeout 280 python3 -m ernieserve bench latency --model "$MODEL" "${common[@]}" --tensor-parallel-size "$tp" \
    --batch-size 1 --input-len 128 --output-len 64 --num-iters-warmup 1 --num-iters 3 "$@" \
    --output-json "$out/latency_${TAG}_tp${tp}.json" 2>&1 | filter \
    | grep -E -i "$engine_lines|decode|prefill|weight|bandwidth|Error|error" | head -20
}

throughput() {  # throughput TP NUM_PROMPTS [extra flags...]
  local tp=$1 n=$2; shift 2
  echo "--- bench throughput, TP=$tp, $n prompts of 1000 in / 200 out $*"
  timeout 280 python3 -m ernieserve bench throughput --model "$MODEL" "${common[@]}" --tensor-parallel-size "$tp" \
    --input-len 1000 --output-len 200 --num-prompts "$n" --max-num-seqs 128 --disable-tqdm "$@" \
    --output-json "$out/throughput_${TAG}_tp${tp}.json" 2>&1 | filter \
    | grep -E -i "$engine_lines|throughput|tokens/s|requests/s|Error|error" | head -20
}

greedy() {  # greedy TP NAME [extra flags...]: token ids of 8 fixed prompts -> $out/greedy_NAME.json
  local tp=$1 name=$2; shift 2
  # a file, not stdin: the spawned tensor-parallel workers re-import the main module by path
  cat > "$out/greedy.py" <<'EOF'
import json, os, sys
from ernieserve import LLM, SamplingParams
model, tp, path, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
if __name__ == "__main__":
    llm = LLM(model=model, load_format="dummy", dtype=os.environ.get("DTYPE", "bfloat16"), max_model_len=2048,
              tensor_parallel_size=tp,
              enable_expert_parallel="--enable-expert-parallel" in extra)
    prompts = [{"prompt_token_ids": [(37 * i + 11 * j) % 100000 + 10 for j in range(16 + 24 * i)]} for i in range(8)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    json.dump([o.outputs[0].token_ids for o in outs], open(path, "w"))
    print(f"wrote {path}")
    llm.llm_engine.core.shutdown()
EOF
  timeout 250 python3 "$out/greedy.py" "$ck21" "$tp" "$out/greedy_$name.json" "$@" 2>&1 | filter \
    | grep -E "$engine_lines|wrote|Error|error"
}

compare() {  # compare NAME_A NAME_B
  python3 - "$out/greedy_$1.json" "$out/greedy_$2.json" "$1" "$2" <<'EOF'
import json, sys
a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
agree = []
for x, y in zip(a, b):
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    agree.append(n)
same = sum(x == y for x, y in zip(a, b))
print(f"GREEDY {sys.argv[3]} vs {sys.argv[4]}: {same}/{len(a)} prompts identical; leading tokens that agree: {agree}")
EOF
}

for stage in "$@"; do
  pkill -9 -f "greedy.py|ernieserve bench|one_engine_bench|ernieserve-tp" 2>/dev/null && sleep 3  # a stage cut off by a timeout
  echo "===== stage $stage $(date -u +%H:%M:%S) ($ngpu GPUs)"
  case $stage in
    tests)  timeout 400 python3 -m pytest -m gpu tests/gpu/test_tp_gpu.py -v -s --no-header -p no:cacheprovider 2>&1 \
              | tee "$out/tests.log" \
              | grep -E "passed|failed|skipped|^E |FAILED|Error|^engine" | head -60 ;;
    # EP=0 skips the expert-parallel variants; TPS="2" measures only TP=2 (device time is scarce)
    equal)  greedy 1 tp1; greedy 2 tp2; compare tp1 tp2
            # expert parallelism keeps the shared experts apart (unfolded): its dummy model is drawn in
            # another order, so its reference is TP=1 with the same flag
            [ "${EP:-1}" = 1 ] && { greedy 1 tp1ep --enable-expert-parallel; greedy 2 tp2ep --enable-expert-parallel
                                    compare tp1ep tp2ep; } ;;
    latency)    MODEL=$ck21 TAG=21b; for tp in ${TPS:-1 2}; do latency "$tp"; done
                [ "${EP:-1}" = 1 ] && latency 2 --enable-expert-parallel ;;
    throughput) MODEL=$ck21 TAG=21b; for tp in ${TPS:-1 2}; do throughput "$tp" 256; done ;;
    big)    [ -f $ck300/config.json ] || python3 -m ernieserve make-dummy --preset ernie-4.5-300b-a47b $ck300 >/dev/null
            [ "$ngpu" -ge 4 ] || { echo "big: needs 4 GPUs, $ngpu visible"; continue; }
            nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$out/mem_300b_${QUANT:-wint4}.csv" &
            smi=$!
            q=${QUANT:-wint4}
            echo "--- one engine: batch-1 decode, then ${BIG_PROMPTS:-128} prompts of 1000 in / 200 out, TP=4 $q"
            timeout 480 python3 benchmarks/one_engine_bench.py --out "$out/big_$q" --num-prompts "${BIG_PROMPTS:-128}" -- \
              --model $ck300 "${common[@]}" --tensor-parallel-size 4 --quantization "$q" --max-num-seqs 128 2>&1 \
              | filter | grep -E -i "$engine_lines|copy bandwidth|ready|holds|decode|floor|Throughput|tokens|Error|error" | head -40
            kill $smi 2>/dev/null; wait $smi 2>/dev/null
            python3 - "$out/mem_300b_${QUANT:-wint4}.csv" <<'EOF'
import sys
peak = {}
for line in open(sys.argv[1]):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 2 and parts[1].isdigit():
        peak[parts[0]] = max(peak.get(parts[0], 0), int(parts[1]))
print("peak memory per GPU (MiB, nvidia-smi):", dict(sorted(peak.items())))
EOF
            ;;
    *) echo "unknown stage $stage (tests|equal|latency|throughput|big)" ;;
  esac
done
