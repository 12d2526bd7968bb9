"""Fused MoE with quantized experts vs bf16, at ERNIE-4.5-21B-A3B's expert shapes, on one GPU.

E 64, top-6, H 2560, I 1536; decode token counts 1, 8, 64, 256 and prefill 4096, 8192. Each method
(bf16, wint8, wint4, wint4 in groups of 128, and on Hopper fp8 and block_wise_fp8) runs one CUDA
graph that applies the layer over `--layers` different weight sets in a row, so the touched experts
come from HBM rather than L2 (as in a model). Routing is the Triton router on random logits.
Printed as a markdown table per token count: microseconds per layer, the ratio to bf16, the bytes
of the experts the routing touches (weights + scales) and the time to read them once at
`--bandwidth` (3.0 TB/s), and the achieved fraction of `--peak-tflops` (790 TFLOP/s, bf16 dense).
Decode should sit near its read time (wint8 ~0.5x and wint4 ~0.27x of bf16's bytes); prefill
should keep most of bf16's matmul rate.

The quantized methods take the path `fused_moe_quant.choose_path` picks per token count (the
method column names it): the fused kernels, or from `DEQUANT_MIN_TOKENS` on the dequant path
(experts dequantized into one scratch shared by the layers, then the bf16 kernels). `--path fused`,
`--path dequant` or `--path assign` (moe_gemv.py's per-assignment GEMVs, which the engine takes at
one token; benchmarks/bench_moe_assign.py measures them as the model runs them) forces one (wint8 /
wint4 only for dequant and assign) to find the crossovers (`DEQUANT_MIN_TOKENS`).

    python3 benchmarks/bench_moe_quant.py [--methods bf16 wint8 wint4] [--path auto|fused|dequant|assign] [--sweep]

Expected to take about a minute on an H100, most of it Triton compiling each method's kernels once
per tile policy (not yet timed on the GPU); `--budget-s` bounds it either way. `--sweep` adds a tile
search at the decode sizes for the quantized methods (minutes): the fused path's tiles. Put the
results in docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernieserve.layers.moe import RouterConfig  # noqa: E402
from ernieserve.layers.moe import fused_moe as fm  # noqa: E402
from ernieserve.layers.moe import fused_moe_quant as fmq  # noqa: E402
from ernieserve.layers.moe.fused_moe import GemmTile  # noqa: E402
from ernieserve.layers.moe.fused_moe_quant import (  # noqa: E402
    DequantScratch,
    ExpertScheme,
    QuantizedExperts,
    QuantMoEPath,
    QuantMoETiles,
)

from gpu_timing import time_graph_within  # benchmarks/gpu_timing.py

E, TOP_K, H, I = 64, 6, 2560, 1536
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@dataclass
class Method:
    name: str
    scheme: ExpertScheme | None  # None: bf16
    group: int = 0


METHODS = [Method("bf16", None), Method("wint8", ExpertScheme.WINT8), Method("wint4", ExpertScheme.WINT4),
           Method("wint4-g128", ExpertScheme.WINT4, 128), Method("fp8", ExpertScheme.FP8),
           Method("block_wise_fp8", ExpertScheme.BLOCK_FP8)]


def make_bf16_layers(num_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return [((torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5).bfloat16(),
             (torch.randn(E, H, I, device="cuda", generator=g) / I**0.5).bfloat16()) for _ in range(num_layers)]


def quantize_layer(w13: torch.Tensor, w2: torch.Tensor, method: Method) -> QuantizedExperts:
    """Projection by projection, as the loader does."""
    assert method.scheme is not None
    experts = QuantizedExperts.empty(method.scheme, method.group, E, H, I, w13.device)
    for e in range(E):
        for proj, w in (("gate", w13[e, :I]), ("up", w13[e, I:]), ("down", w2[e])):
            experts.store(e, proj, *fmq.quantize_rows(w, method.scheme, method.group))
    return experts


def routing(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(num_tokens, E, device="cuda")
    return fm.triton_select_experts(logits, RouterConfig(E, TOP_K, True, 1e-12, True, False), None)


def layer_runner(x: torch.Tensor, layers: list, weights: torch.Tensor, ids: torch.Tensor,
                 tiles: QuantMoETiles | None = None, scratch: DequantScratch | None = None,
                 path: QuantMoEPath = QuantMoEPath.AUTO) -> Callable[[], None]:
    """scratch: one for all layers, as in a model (time_graph's warm-up run allocates it)."""
    def run() -> None:
        for layer in layers:
            if isinstance(layer, QuantizedExperts):
                fmq.fused_moe_quant_triton(x, layer, weights, ids, tiles, scratch=scratch, path=path)
            else:
                fm.fused_moe_triton(x, layer[0], layer[1], weights, ids)
    return run


def expert_bytes(layer: QuantizedExperts | tuple[torch.Tensor, torch.Tensor]) -> float:
    """Bytes of one expert: weights plus scales."""
    if isinstance(layer, QuantizedExperts):
        return layer.nbytes() / E
    return 3 * I * H * 2


# ---- an optional tile search at decode sizes ------------------------------------------------------

GATE_UP = [GemmTile(bn, bk, w, s) for bn, bk, w, s in ((32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4),
                                                       (64, 256, 4, 3), (16, 256, 4, 5), (32, 512, 4, 3),
                                                       (32, 256, 4, 3), (16, 512, 4, 3), (64, 256, 8, 3))]
DOWN = [GemmTile(bn, bk, w, s) for bn, bk, w, s in ((64, 256, 4, 3), (128, 128, 4, 4), (128, 256, 4, 3),
                                                    (64, 128, 4, 4), (256, 128, 8, 3), (32, 256, 4, 4),
                                                    (64, 512, 4, 3), (128, 256, 8, 3), (32, 512, 4, 3))]
def sweep(x, layers, weights, ids, default: QuantMoETiles, group: int, deadline: float,
          path: QuantMoEPath = QuantMoEPath.FUSED) -> tuple[float, QuantMoETiles]:
    """Coordinate descent over the gate/up tile, then the down tile, then the down split."""
    gate_ups, downs = GATE_UP, DOWN

    def fits(t: GemmTile) -> bool:
        return not group or group % t.block_k == 0

    def timed(tiles: QuantMoETiles) -> float:
        if time.monotonic() > deadline:
            return float("inf")
        try:
            return time_graph_within(layer_runner(x, layers, weights, ids, tiles, path=path), budget_ms=100)
        except Exception as e:  # e.g. out of shared memory for this tile
            print(f"  skip {tiles}: {type(e).__name__}", file=sys.stderr)
            return float("inf")

    best = (timed(default), default)
    for g in filter(fits, gate_ups):
        cand = QuantMoETiles(default.block_m, g, best[1].down, best[1].down_split)
        best = min(best, (timed(cand), cand), key=lambda b: b[0])
    for d in filter(fits, downs):
        cand = QuantMoETiles(default.block_m, best[1].gate_up, d, best[1].down_split)
        best = min(best, (timed(cand), cand), key=lambda b: b[0])
    for split in (1, 2, 3, 4, 6):
        cand = QuantMoETiles(default.block_m, best[1].gate_up, best[1].down, split)
        best = min(best, (timed(cand), cand), key=lambda b: b[0])
    return best


def _fmt(t: QuantMoETiles) -> str:
    g, d = t.gate_up, t.down
    return (f"M{t.block_m} gu(N{g.block_n} K{g.block_k} w{g.num_warps} s{g.num_stages}) "
            f"dn(N{d.block_n} K{d.block_k} w{d.num_warps} s{d.num_stages} split{t.down_split})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 4096, 8192])
    ap.add_argument("--methods", nargs="+", default=[m.name for m in METHODS], choices=[m.name for m in METHODS])
    ap.add_argument("--layers", type=int, default=4, help="weight sets run in a row per replay (defeats L2)")
    ap.add_argument("--bandwidth", type=float, default=3.0, help="TB/s for the read-time column")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="TFLOP/s for the matmul-rate column")
    ap.add_argument("--path", choices=[p.value for p in QuantMoEPath], default="auto",
                    help="quantized methods: the path by token count (auto), or force fused / dequant / assign "
                         "(moe_gemv's per-assignment GEMVs, weight-only per channel)")
    ap.add_argument("--sweep", action="store_true",
                    help="search the fused path's decode tiles for the quantized methods")
    ap.add_argument("--budget-s", type=float, default=600.0, help="stop measuring (rows say so) after this long")
    args = ap.parse_args()
    start = time.monotonic()
    torch.manual_seed(0)
    path = QuantMoEPath(args.path)
    methods = [m for m in METHODS if m.name in args.methods and (HOPPER or m.scheme is None or not m.scheme.is_fp8)]
    if path in (QuantMoEPath.DEQUANT, QuantMoEPath.ASSIGN):  # fp8 keeps its fp8 dots: no dequant or assign path
        methods = [m for m in methods if m.scheme is None or not m.scheme.is_fp8]
    scratch = DequantScratch()  # shared by every method's layers, as by a model's
    print(f"# {torch.cuda.get_device_name()}: fused MoE, E={E} top_k={TOP_K} H={H} I={I}, {args.layers} layers "
          f"per graph; read time at {args.bandwidth} TB/s, matmul rate vs {args.peak_tflops:.0f} TFLOP/s\n")
    bf16_layers = make_bf16_layers(args.layers)
    inputs = {t: (torch.randn(t, H, device="cuda").bfloat16(), *routing(t)) for t in args.tokens}
    results: dict[tuple[int, str], str] = {}
    bf16_us: dict[int, float] = {}
    sweeps: list[str] = []
    for method in methods:  # one method's weights at a time
        layers = bf16_layers if method.scheme is None else [quantize_layer(w13, w2, method) for w13, w2 in bf16_layers]
        per_expert = expert_bytes(layers[0])
        for t in args.tokens:
            x, weights, ids = inputs[t]
            if time.monotonic() - start > args.budget_s:
                results[(t, method.name)] = f"| {t} | {method.name} | skipped: --budget-s reached | | | | | | |"
                continue
            run = layer_runner(x, layers, weights, ids, scratch=scratch, path=path)
            us = time_graph_within(run) * 1e3 / len(layers)
            if method.scheme is None:
                bf16_us[t] = us
            touched = int(torch.unique(ids).numel())
            read_us = touched * per_expert / (args.bandwidth * 1e12) * 1e6
            tflops = 2 * t * TOP_K * 3 * I * H / (us * 1e-6) / 1e12
            ratio = f"{us / bf16_us[t]:.2f}x" if t in bf16_us else "-"
            label = method.name
            if method.scheme is not None:
                taken = path if path is not QuantMoEPath.AUTO else fmq.choose_path(t, method.scheme, scratch, grouped=layers[0].scale_group > 0)
                label = f"{method.name} ({taken.value})"
            results[(t, method.name)] = (
                f"| {t} | {label} | {us:.1f} | {ratio} | {touched} | {touched * per_expert / 1e6:.1f} | "
                f"{read_us:.1f} | {us / read_us:.2f}x | {tflops:.0f} | {tflops / args.peak_tflops:.0%} |")
            if args.sweep and method.scheme is not None and t <= 64:
                default = fmq.choose_quant_tiles(t * TOP_K, E, layers[0], x.device)
                best_ms, best = sweep(x, layers, weights, ids, default, layers[0].scale_group,
                                      start + args.budget_s, QuantMoEPath.FUSED)
                sweeps.append(f"| {t} | {method.name} | {us:.1f} | {best_ms * 1e3 / len(layers):.1f} | "
                              f"{_fmt(default)} | {_fmt(best)} |")
        del layers
        scratch.buffer = None
        torch.cuda.empty_cache()
    print("| tokens | method | us/layer | vs bf16 | experts touched | MB read | read us | x read time | TFLOP/s | "
          "of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in args.tokens:
        for method in methods:
            print(results[(t, method.name)])
    if sweeps:
        print("\n| tokens | method | default us | swept us | default tiles | best tiles |\n|---|---|---|---|---|---|")
        print("\n".join(sweeps))
    print(f"\n({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
