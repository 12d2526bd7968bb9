"""One token through ERNIE-4.5-21B-A3B's MoE layer with quantized experts: the fused kernels against
the per-assignment GEMVs (moe_gemv.assignment_path), on one GPU.

The layer as the model runs it at batch 1: 6 routed experts out of 64 and the 2 folded shared
experts (slots 6 and 7, experts 64 and 65), one GEMM block per assignment
(fused_moe.per_assignment_alignment), the shared experts' gate/up before the PDL wait, the down
GEMM's early reads; outputs per slot (the next RMSNorm adds them). One CUDA graph applies the layer
over `--layers` weight sets in a row, so the experts come from HBM rather than L2. Prints
microseconds per layer and the time to read the 8 experts' bytes once at `--bandwidth` (3.0 TB/s).
`--sweep` tries the GEMVs' rows per tile (gate/up, down).

    python3 benchmarks/bench_moe_assign.py [--methods bf16 wint8 wint4] [--sweep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernieserve.layers.moe import fused_moe as fm  # noqa: E402
from ernieserve.layers.moe import fused_moe_quant as fmq  # noqa: E402
from ernieserve.layers.moe import moe_gemv  # noqa: E402
from ernieserve.layers.moe.fused_moe_quant import ExpertScheme, QuantizedExperts, QuantMoEPath  # noqa: E402

from gpu_timing import time_graph_within  # benchmarks/gpu_timing.py

E, SHARED, TOP_K, H, I = 64, 2, 6, 2560, 1536


def random_experts(scheme: ExpertScheme, g: torch.Generator) -> QuantizedExperts:
    """Random stored values and scales of the right magnitude (quantizing bf16 weights would only
    take longer: the kernels read the same bytes)."""
    ex = QuantizedExperts.empty(scheme, 0, E + SHARED, H, I, torch.device("cuda"))
    for w, s, k in ((ex.w13, ex.w13_scale, H), (ex.w2, ex.w2_scale, I)):
        w.view(torch.uint8).copy_(torch.randint(0, 256, w.shape, device="cuda", generator=g, dtype=torch.uint8))
        s.fill_((1.0 / k**0.5) / (7.0 if scheme is ExpertScheme.WINT4 else 127.0))
    return ex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["bf16", "wint8", "wint4"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--bandwidth", type=float, default=3.0e12)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, H, device="cuda", generator=g).bfloat16()
    routed = torch.randperm(E, device="cuda", generator=g)[:TOP_K]
    ids = torch.cat([routed, torch.arange(E, E + SHARED, device="cuda")]).to(torch.int32).view(1, -1).contiguous()
    weights = torch.cat([torch.full((TOP_K,), 1.0 / TOP_K, device="cuda"),
                         torch.ones(SHARED, device="cuda")]).view(1, -1)
    print(f"MoE layer at one token: {TOP_K} routed of {E} + {SHARED} shared, H {H}, I {I}; "
          f"{args.layers} weight sets per graph; us per layer")
    print("| method | path | tiles | us | read time of 8 experts | x read time |")
    print("|---|---|---|---|---|---|")
    for name in args.methods:
        if name == "bf16":
            layers = [((torch.randn(E + SHARED, 2 * I, H, device="cuda", generator=g) / H**0.5).bfloat16(),
                       (torch.randn(E + SHARED, H, I, device="cuda", generator=g) / I**0.5).bfloat16())
                      for _ in range(args.layers)]
            per_expert = 3 * H * I * 2
        else:
            layers = [random_experts(ExpertScheme(name), g) for _ in range(args.layers)]
            per_expert = layers[0].nbytes() / (E + SHARED)
        align = fm.per_assignment_alignment(ids, E + SHARED, 16)
        read_us = (TOP_K + SHARED) * per_expert / args.bandwidth * 1e6

        def timed(path: QuantMoEPath | None, tiles: tuple[int, int] | None = None) -> float:
            def run() -> None:
                for layer in layers:
                    if path is None:
                        fm.fused_moe_triton(x, layer[0], layer[1], weights, ids, sum_slots=False,
                                            alignment=fm.per_assignment_alignment(
                                                ids, E + SHARED, fm.choose_tile_config(8, E + SHARED).block_m),
                                            shared_slots=SHARED)
                    elif path is QuantMoEPath.ASSIGN:
                        moe_gemv.assignment_path(x, layer, weights, ids, sum_slots=False, shared_slots=SHARED,
                                                 tiles=tiles)
                    else:
                        fmq.fused_moe_quant_triton(x, layer, weights, ids, sum_slots=False, path=path,
                                                   alignment=align, shared_slots=SHARED)
            return time_graph_within(run, budget_ms=200) * 1e3 / len(layers)

        def row(path_name: str, tiles: str, us: float) -> None:
            print(f"| {name} | {path_name} | {tiles} | {us:.1f} | {read_us:.1f} | {us / read_us:.2f} |", flush=True)

        if name == "bf16":
            row("fused", "policy", timed(None))
            continue
        row("fused", "policy", timed(QuantMoEPath.FUSED))
        default = moe_gemv.assign_tiles(layers[0])
        row("assign", f"{tuple(default)} (default)", timed(QuantMoEPath.ASSIGN))
        if args.sweep:  # rows per tile (gate/up, down)
            for gu in (1, 2, 4):
                for dn in (4, 8, 16):
                    if (gu, dn) != tuple(default):
                        row("assign", f"({gu}, {dn})", timed(QuantMoEPath.ASSIGN, (gu, dn)))
        layers = []  # noqa: F841 (frees this method's weights before the next)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
