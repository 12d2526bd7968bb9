"""`bench latency` and `bench throughput` on ONE engine, for models whose load dominates a run
(ERNIE-4.5-300B-A47B at TP=4: every extra start costs minutes of scarce multi-GPU time).

    python3 benchmarks/one_engine_bench.py --out DIR -- --model CKPT --load-format dummy \
        --tensor-parallel-size 4 --quantization wint4 --max-model-len 2048 --max-num-seqs 128

After `--` come engine flags (those of `ernieserve bench throughput`). Prints and writes to DIR:
- the device's measured copy bandwidth (bytes read + written per second, one 1 GiB buffer);
- batch-1 decode (128-token prompts, 64 output tokens, 3 iterations after 1 warm-up) with the
  bandwidth floor of rank 0: the bytes a batch-1 step must read on one GPU, i.e. its non-expert
  weights plus top_k / num_experts of its expert weights, over the measured copy bandwidth (as
  everywhere in docs/performance.md);
- offline throughput: --num-prompts prompts of 1000 random tokens in, 200 out, ignore_eos.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def copy_bandwidth_gbs(device) -> float:
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, n = time.perf_counter(), 20
    for _ in range(n):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    rate = 2 * src.numel() * n / (time.perf_counter() - start) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return rate


def batch1_bytes(model) -> tuple[int, int]:
    """(all weight bytes, bytes a one-token step reads) of this rank's model."""
    from ernieserve.layers.moe.layer import FusedMoE

    def nbytes(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    total = nbytes(model)
    touched = total
    for m in model.modules():
        if isinstance(m, FusedMoE):
            experts = nbytes(m)
            touched -= experts - experts * m.top_k // m.num_experts
    return total, touched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-prompts", type=int, default=128)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    engine_argv = argv[split + 1:]
    os.makedirs(args.out, exist_ok=True)

    import torch

    from ernieserve.bench import latency, throughput

    lat_parser, thr_parser = argparse.ArgumentParser(), argparse.ArgumentParser()
    latency.add_cli_args(lat_parser)
    throughput.add_cli_args(thr_parser)
    bandwidth = copy_bandwidth_gbs(torch.device("cuda", 0)) if torch.cuda.is_available() else None
    if bandwidth is not None:
        print(f"copy bandwidth, GPU 0: {bandwidth:.0f} GB/s (read + written)", flush=True)
    lat_args = lat_parser.parse_args(engine_argv + [
        "--batch-size", "1", "--input-len", "128", "--output-len", "64", "--num-iters-warmup", "1",
        "--num-iters", "3", "--output-json", os.path.join(args.out, "latency.json")])
    thr_args = thr_parser.parse_args(engine_argv + [
        "--input-len", "1000", "--output-len", "200", "--num-prompts", str(args.num_prompts),
        "--disable-tqdm", "--output-json", os.path.join(args.out, "throughput.json")])

    start = time.perf_counter()
    llm = throughput.create_llm(thr_args)
    print(f"engine ready in {time.perf_counter() - start:.1f} s", flush=True)
    total, touched = batch1_bytes(llm.llm_engine.core.runner.model)
    print(f"rank 0 holds {total / 2**30:.2f} GiB of weights; a batch-1 step reads {touched / 2**30:.2f} GiB of them",
          flush=True)
    latency.main(lat_args, llm)
    decode_ms = json.load(open(os.path.join(args.out, "latency.json")))["decode_step_ms_p50"]
    summary = {"rank0_weight_bytes": total, "rank0_batch1_bytes": touched, "decode_step_ms_p50": decode_ms,
               "copy_bandwidth_gbs": bandwidth}
    if bandwidth is not None:
        # HBM traffic: a copy's rate counts bytes read plus written; reading the weights is all a step needs
        floor_ms = touched / (bandwidth * 1e9) * 1e3
        summary["batch1_floor_ms"] = floor_ms
        print(f"batch-1 decode p50 {decode_ms:.2f} ms; floor (rank 0's touched weights read once at "
              f"{bandwidth:.0f} GB/s) {floor_ms:.2f} ms: {floor_ms / decode_ms:.0%} of the floor's speed", flush=True)
    throughput.main(thr_args, llm)
    summary["throughput"] = json.load(open(os.path.join(args.out, "throughput.json")))
    if torch.cuda.is_available():
        summary["rank0_max_allocated_bytes"] = torch.cuda.max_memory_allocated(0)
    json.dump(summary, open(os.path.join(args.out, "summary.json"), "w"), indent=2)
    sys.stdout.flush()
    # the engine's workers end with it; skip a slow NCCL teardown at interpreter exit
    llm.llm_engine.core.shutdown()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
