#!/usr/bin/env bash
# One device session's measurements, stage by stage, each under its own time limit, logs to $OUT.
# stages: tests dense densemixed mixedprof decodeprof serve moe sampling attn quant quantprof trace pdl switches
# Every figure in docs/performance.md names the stage that produced it.
# QUANT_METHODS (quant, quantprof stages): the --quantization methods to run, "none" = bf16
#   (default "none wint8 wint4"; e.g. QUANT_METHODS="fp8 block_wise_fp8" on Hopper).
# Everything printed also goes to $OUT/gpu_session.log: the device tool returns only the last
# 12,000 characters of output, and a long stage can push an earlier one's summary line out of it.
set -uo pipefail
out=${OUT:-/tmp/gpu_out}; mkdir -p "$out"
exec > >(tee -a "$out/gpu_session.log") 2>&1
export PYTHONUNBUFFERED=1
filter() { grep -v -E "it/s\]|B/s\]|s/it\]|graph/s\]|shard/s\]"; }
for stage in "$@"; do
  echo "===== stage $stage $(date -u +%H:%M:%S)"
  case $stage in
    # the whole GPU suite but tensor parallelism (benchmarks/tp_gpu.sh tests, 2 GPUs): about 5 minutes
    # on an H100; the kernels first, so a broken kernel shows before the engine tests that use it
    tests)  timeout 540 python3 -m pytest -m gpu tests/gpu/test_paged_attention_gpu.py tests/gpu/test_gemv_gpu.py tests/gpu/test_quantization_gpu.py \
              tests/gpu/test_fused_elementwise_gpu.py tests/gpu/test_sampling_gpu.py tests/gpu/test_fused_moe_gpu.py \
              tests/gpu/test_moe_quant_gpu.py tests/gpu/test_moe_assign_gpu.py tests/gpu/test_swap_gpu.py tests/gpu/test_engine_gpu.py \
              tests/gpu/test_vl_gpu.py \
              -q -s --no-header -p no:cacheprovider --durations=8 2>&1 \
              | grep -E "passed|failed|GREEDY|logit std|^E |FAILED|Error|s call" | head -60 ;;
    # ERNIESERVE_STEP_STATS: where each step's time goes (engine/step_stats.py), printed per run
    dense)  ERNIESERVE_STEP_STATS=1 timeout 200 python3 benchmarks/compare_hf.py --preset ernie-4.5-0.3b --checkpoint /tmp/ckpt-03b \
              --num-prompts 256 --hf-batch-prompts 16 --out "$out/dense.json" 2>&1 | filter | tail -24 ;;
    # the same with mixed prefill+decode steps from CUDA graphs too (opt-in until this measures it)
    densemixed) ERNIESERVE_STEP_STATS=1 timeout 200 python3 benchmarks/compare_hf.py --preset ernie-4.5-0.3b \
              --checkpoint /tmp/ckpt-03b --num-prompts 256 --skip-hf --out "$out/dense_mixed.json" \
              --engine-args '{"graph_optimization_config": "{\"cudagraph_mixed_steps\": true}"}' 2>&1 | filter | tail -24 ;;
    # torch.profiler over three eager prefill steps of 2,048 tokens (steps 4..6 of the run): the kernels
    # and device time of one mixed step, next to its host time in the step stats
    mixedprof) ERNIESERVE_STEP_STATS=1 ERNIESERVE_PROFILE_STEPS=4:3 timeout 150 python3 -m ernieserve bench throughput \
              --model /tmp/ckpt-03b --dtype bfloat16 --input-len 1000 --output-len 32 --num-prompts 128 --disable-tqdm 2>&1 \
              | filter | grep -v -E "^\s*$" | tail -40 ;;
    # torch.profiler over ten batch-1 decode steps replayed from the graph: the kernels inside it
    decodeprof) [ -f /tmp/ckpt-03b/config.json ] || python3 -m ernieserve make-dummy --preset ernie-4.5-0.3b /tmp/ckpt-03b >/dev/null
              ERNIESERVE_PROFILE_STEPS=20:10 timeout 120 python3 -m ernieserve bench latency --model /tmp/ckpt-03b \
              --dtype bfloat16 --batch-size 1 --input-len 128 --output-len 64 --num-iters-warmup 0 --num-iters 1 2>&1 \
              | filter | grep -A24 "torch.profiler over" ;;
    serve)  [ -f /tmp/ckpt-03b/config.json ] || python3 -m ernieserve make-dummy --preset ernie-4.5-0.3b /tmp/ckpt-03b
            timeout 140 bash benchmarks/serve_gpu.sh /tmp/ckpt-03b 128 64 1000 1000 "$out" 2>&1 | filter | tail -40 ;;
    # HF's 21B does not fit beside our engine in one process: ours here, HF needs its own run
    moe)    ERNIESERVE_STEP_STATS=1 timeout 300 python3 benchmarks/compare_hf.py --preset ernie-4.5-21b-a3b --checkpoint /tmp/ckpt-21b \
              --load-format dummy --num-prompts 256 --skip-hf --out "$out/moe.json" 2>&1 | filter | tail -24 ;;
    sampling) timeout 120 python3 benchmarks/bench_sampling.py 2>&1 | tail -8 ;;
    # decode attention as a captured graph runs it (splits fixed for the longest context) against
    # the policy's split count for the real context and no split, 0.3B and 21B layouts
    attn)   for layout in "--heads 16 --kv-heads 2" "--heads 20 --kv-heads 4"; do
              timeout 150 python3 benchmarks/bench_attention.py $layout --context 190,1024,8192 --batch-sizes 1,8,64 \
                --splits graph,policy,1 --skip-ref 2>&1 | tail -30
            done ;;
    # torch.profiler over ten batch-1 decode steps of 21B-A3B per method: where quantized decode goes
    quantprof) [ -f /tmp/ckpt-21b/config.json ] || python3 -m ernieserve make-dummy --preset ernie-4.5-21b-a3b /tmp/ckpt-21b
            for q in ${QUANT_METHODS:-none wint8 wint4}; do
              extra=(); [ "$q" != none ] && extra=(--quantization "$q")
              echo "--- $q"
              ERNIESERVE_PROFILE_STEPS=20:10 timeout 150 python3 -m ernieserve bench latency --model /tmp/ckpt-21b \
                --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 128 --output-len 64 --num-iters-warmup 0 \
                --num-iters 1 --max-model-len 2048 --max-num-seqs 8 "${extra[@]}" 2>&1 | filter | grep -A16 "torch.profiler over"
            done ;;
    # the same ten steps' timeline: where the device idles between and around the graph replays
    # (benchmarks/trace_gaps.py), per method
    trace)  [ -f /tmp/ckpt-21b/config.json ] || python3 -m ernieserve make-dummy --preset ernie-4.5-21b-a3b /tmp/ckpt-21b
            for q in ${QUANT_METHODS:-none wint4}; do
              extra=(); [ "$q" != none ] && extra=(--quantization "$q")
              echo "--- $q"
              ERNIESERVE_PROFILE_STEPS=20:10 ERNIESERVE_PROFILE_TRACE="$out/trace_$q.json" timeout 150 python3 -m ernieserve \
                bench latency --model /tmp/ckpt-21b --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 128 \
                --output-len 64 --num-iters-warmup 0 --num-iters 1 --max-model-len 2048 --max-num-seqs 8 "${extra[@]}" 2>&1 \
                | filter | grep -E "Decode|p50|kernels and" | head -6
              python3 benchmarks/trace_gaps.py "$out/trace_$q.json" --steps 10 --rows 15
              gzip -f "$out/trace_$q.json"
            done ;;
    quant)  [ -f /tmp/ckpt-21b/config.json ] || python3 -m ernieserve make-dummy --preset ernie-4.5-21b-a3b /tmp/ckpt-21b
            for q in ${QUANT_METHODS:-none wint8 wint4}; do
              extra=(); [ "$q" != none ] && extra=(--quantization "$q")
              timeout 200 python3 -m ernieserve bench latency --model /tmp/ckpt-21b --load-format dummy --dtype bfloat16 \
                --batch-size 1 --input-len 128 --output-len 64 --num-iters-warmup 1 --num-iters 3 --max-model-len 2048 \
                --mem-bandwidth-gbs 3000 --max-num-seqs 8 "${extra[@]}" 2>&1 | filter | grep -E -i "decode|prefill|mean|weight|bandwidth|GiB|Peak|Captured|Error|error" | head -20
            done ;;
    # programmatic dependent launch (kernels/pdl.py; on by default, off with ERNIESERVE_PDL=0): its GPU tests (PDL on
    # and off give the same bits: a kernel chain in replayed graphs, the engine's greedy tokens), then
    # 21B-A3B batch-1 latency without and with it, each twice, alternating (PDL_ROUNDS=1: once each)
    pdl)    timeout 300 python3 -m pytest -m gpu tests/gpu/test_pdl_gpu.py -q -s --no-header -p no:cacheprovider \
              --durations=8 2>&1 | grep -E "passed|failed|skipped|^E |FAILED|Error|s call" | head -30
            [ -f /tmp/ckpt-21b/config.json ] || python3 -m ernieserve make-dummy --preset ernie-4.5-21b-a3b /tmp/ckpt-21b
            for round in $(seq "${PDL_ROUNDS:-2}"); do
              for v in 0 1; do
                echo "--- ERNIESERVE_PDL=$v (round $round)"
                ERNIESERVE_PDL=$v timeout 200 python3 -m ernieserve bench latency --model /tmp/ckpt-21b --load-format dummy \
                  --dtype bfloat16 --batch-size 1 --input-len 128 --output-len 64 --num-iters-warmup 1 --num-iters 3 \
                  --max-model-len 2048 --max-num-seqs 8 2>&1 | filter | grep -E -i "decode|prefill|mean|Captured|Error|error" | head -12
              done
            done ;;
    # experimental switches A/B (environment variables), 21B-A3B batch-1 latency, one run per set and
    # method, alternating: SWITCH_SETS="base;VAR=1;VAR=1 OTHER=8" ("base": none), QUANT_METHODS as quant
    switches) [ -f /tmp/ckpt-21b/config.json ] || python3 -m ernieserve make-dummy --preset ernie-4.5-21b-a3b /tmp/ckpt-21b
            IFS=';' read -r -a sets <<< "${SWITCH_SETS:-base}"
            for q in ${QUANT_METHODS:-none}; do
              extra=(); [ "$q" != none ] && extra=(--quantization "$q")
              for set in "${sets[@]}"; do
                envs=(); [ "$set" != base ] && read -r -a envs <<< "$set"
                echo "--- $q: $set"
                env "${envs[@]}" timeout 200 python3 -m ernieserve bench latency --model /tmp/ckpt-21b --load-format dummy \
                  --dtype bfloat16 --batch-size 1 --input-len 128 --output-len 64 --num-iters-warmup 1 --num-iters 3 \
                  --max-model-len 2048 --max-num-seqs 8 "${extra[@]}" 2>&1 | filter | grep -E -i "decode step|  mean|Error|error" | head -6
              done
            done ;;
    *)      echo "unknown stage '$stage' (the stages are listed at the top of $0)"; exit 2 ;;
  esac
done
