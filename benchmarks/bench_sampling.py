"""Sampler step time on the GPU: the Gumbel-max race kernel against the torch path it replaces.

    python3 benchmarks/bench_sampling.py [--vocab 103424] [--rows 1 64 256]

Every row samples at temperature 0.8 with a seed (the offline benchmark's path), from bf16 logits
as the LM head returns them. Times the whole `Sampler` call (fp32 copy, temperature, the race),
eagerly as the engine runs it, in ms per call (CUDA events over 50 calls after 5 warm-ups), and
the time to read the fp32 logits once at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse

import torch

from ernieserve.layers import sampler as sampler_mod
from ernieserve.layers.sampler import Sampler
from ernieserve.layers.sampling_metadata import SamplingMetadata


def time_ms(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy rate, bytes read + written (the buffers are freed on return)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_ms(lambda: dst.copy_(src), 20) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=103424)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    args = ap.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write): {copy_gbs:.0f} GB/s")
    print(f"{'rows':>5} {'race kernel ms':>15} {'torch path ms':>14} {'speed-up':>9} {'read fp32 logits once ms':>25}")
    sampler = Sampler()
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab, device="cuda").to(torch.bfloat16)
        meta = SamplingMetadata(temperature=torch.full((rows,), 0.8, device="cuda"), all_greedy=False, all_random=True)
        meta.seeds = {r: r * 7919 + 17 for r in range(rows)}
        kernel = time_ms(lambda: sampler(logits, meta))
        cached = sampler_mod.sampling_kernels
        sampler_mod.sampling_kernels = lambda: None  # the torch reference path
        try:
            torch_ms = time_ms(lambda: sampler(logits, meta))
        finally:
            sampler_mod.sampling_kernels = cached
        floor = rows * args.vocab * 4 / (copy_gbs * 1e9) * 1e3
        print(f"{rows:>5} {kernel:>15.3f} {torch_ms:>14.3f} {torch_ms / kernel:>8.1f}x {floor:>25.4f}")


if __name__ == "__main__":
    main()
