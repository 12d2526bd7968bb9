"""Dense decode GEMV (kernels/gemv.py) against cuBLAS (torch.nn.functional.linear), as a CUDA graph
runs them: µs per call and weight-read rate, at the shapes of ERNIE-4.5-21B-A3B's attention
projections and ERNIE-4.5-0.3B's linears.

    python3 benchmarks/bench_gemv.py [--tokens 1,4,8] [--sweep]

Each measurement captures a graph of L calls on L different weights (L sized so they total about
400 MB, far beyond the 50 MB L2: every call reads its weight from HBM, as in a model), replays it,
and divides. --sweep also times a grid of tiles (BLOCK_N, BLOCK_K, programs per SM, warps) and
prints the best, to pick `choose_gemv_tiles`' policy from.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

SHAPES = [  # (name, N, K)
    ("21B qkv_proj", 3584, 2560),
    ("21B o_proj", 2560, 2560),
    ("21B dense gate_up", 24576, 2560),
    ("0.3B qkv_proj", 1536, 1024),
    ("0.3B gate_up", 6144, 1024),
    ("0.3B down", 1024, 3072),
]


def graph_us(fn_per_layer, layers: int, replays: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(layers):  # warm-up (compiles, allocates)
            fn_per_layer(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(layers):
            fn_per_layer(i)
    g.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays / layers * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,4,8")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    from ernieserve.kernels.gemv import GemvTiles, choose_gemv_tiles, gemv

    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}")
    print("| shape | tokens | cuBLAS us | cuBLAS GB/s | gemv (policy) us | GB/s | tiles | best swept us | best tiles |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, n, k), m in itertools.product(SHAPES, [int(t) for t in args.tokens.split(",")]):
        nbytes = n * k * 2
        layers = max(4, min(200, (400 << 20) // nbytes))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(layers)]
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x, ws[0])
        err = (gemv(x, ws[0]).float() - ref.float()).abs().max().item()
        assert err < 0.05 * ref.float().abs().max().item() + 1e-2, f"{name} M={m}: max error {err}"
        cublas = graph_us(lambda i: torch.nn.functional.linear(x, ws[i]), layers)
        policy = choose_gemv_tiles(m, n, k, dev)
        ours = graph_us(lambda i: gemv(x, ws[i], tiles=policy), layers)
        best, best_t = float("nan"), None
        if args.sweep:
            bm = policy.block_m
            for bn, bk, pps, warps in itertools.product((16, 32, 64), (128, 256, 512), (2, 4, 8), (4, 8)):
                if bm * bn * bk > 64 * 1024 * 4:
                    continue
                t = choose_gemv_tiles(m, n, k, dev, programs_per_sm=pps)
                t = GemvTiles(bm, bn, bk, t.split_k, warps)
                tiles_mn = -(-m // bm) * -(-n // bn)
                sms = torch.cuda.get_device_properties(dev).multi_processor_count
                split = max(1, min(16, pps * sms // tiles_mn, -(-k // (2 * bk))))
                t = GemvTiles(bm, bn, bk, split, warps)
                us = graph_us(lambda i: gemv(x, ws[i], tiles=t), layers, replays=10)
                if not us >= best:
                    best, best_t = us, t
        rate = lambda us: nbytes / us / 1e3  # noqa: E731  GB/s
        print(f"| {name} [{n}x{k}] | {m} | {cublas:.2f} | {rate(cublas):.0f} | {ours:.2f} | {rate(ours):.0f} | "
              f"{policy.block_n}x{policy.block_k} split {policy.split_k} w{policy.num_warps} | "
              + (f"{best:.2f} ({rate(best):.0f} GB/s) | {best_t.block_n}x{best_t.block_k} split {best_t.split_k} "
                 f"w{best_t.num_warps} |" if best_t else "- | - |"), flush=True)
        del ws


if __name__ == "__main__":
    main()
