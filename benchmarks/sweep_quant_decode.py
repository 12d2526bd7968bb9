"""Tile search for the dense weight-only GEMM at decode sizes (kernels/quant_matmul.py,
`choose_tiles`), on one GPU: for each method (wint8, wint4, wint4-g128), shape and token count,
times the policy's tiles and a grid of (BLOCK_N, BLOCK_K, split K, stages) in a CUDA graph over
weight copies that defeat L2, and prints the policy's time, the best time and its tiles.

    python3 benchmarks/sweep_quant_decode.py [--tokens 1 8] [--budget-s 240]

Shapes: ERNIE-4.5-21B-A3B's qkv_proj (3584 x 2560) and o_proj (2560 x 2560).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernieserve.kernels import quant_matmul as qm  # noqa: E402

from gpu_timing import time_graph  # noqa: E402  benchmarks/gpu_timing.py

SHAPES = [(3584, 2560), (2560, 2560)]
METHODS = [("wint8", 8, 0), ("wint4", 4, 0), ("wint4-g128", 4, 128)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budget-s", type=float, default=240.0)
    args = ap.parse_args()
    deadline = time.monotonic() + args.budget_s
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}")
    print("| method | N x K | tokens | policy us | policy tiles | best us | best tiles |")
    print("|---|---|---|---|---|---|---|")
    for (name, bits, group), (n, k) in itertools.product(METHODS, SHAPES):
        copies = max(4, (256 << 20) // (n * k * bits // 8))
        quantize = qm.quantize_int8 if bits == 8 else qm.quantize_int4
        weights = [quantize(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02, group) for _ in range(copies)]
        for m in args.tokens:
            if time.monotonic() > deadline:
                print(f"| {name} | {n}x{k} | {m} | skipped: --budget-s reached | | | |", flush=True)
                continue
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)

            def timed(tiles: qm.GemmTiles | None) -> float:
                try:
                    ms = time_graph(lambda: [qm.weight_only_matmul(x, q, s, bits, group, tiles=tiles)
                                             for q, s in weights], iters=10)
                except Exception as e:  # e.g. shared memory for a tile
                    print(f"  skip {tiles}: {type(e).__name__}", file=sys.stderr)
                    return float("inf")
                return ms * 1e3 / copies

            policy = qm.choose_tiles(m, n, k, group, dev)
            base = timed(None)
            best, best_t = base, policy
            for bn, bk, split, stages in itertools.product((32, 64, 128), (128, 256, 512), (1, 2, 4, 8), (3, 4)):
                if group and group % bk:
                    continue
                if time.monotonic() > deadline:
                    break
                t = qm.GemmTiles(policy.block_m, bn, bk, split, 4, stages)
                us = timed(t)
                if us < best:
                    best, best_t = us, t
            fmt = lambda t: f"N{t.block_n} K{t.block_k} split{t.split_k} s{t.num_stages}"  # noqa: E731
            print(f"| {name} | {n}x{k} | {m} | {base:.2f} | {fmt(policy)} | {best:.2f} | {fmt(best_t)} |", flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
