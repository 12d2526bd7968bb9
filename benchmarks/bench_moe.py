"""Times the fused MoE layer against its two floors, on one GPU, in bf16.

Decode shapes (1..256 tokens): time vs reading the touched experts' weights once at the measured
copy bandwidth (target: within 1.5x). Prefill shapes (4096+ tokens): achieved TFLOP/s vs the
measured bf16 matmul rate (target: at least 50%). Both ceilings are measured in the same run.

Each measurement replays a CUDA graph that runs the layer over `--layers` different weight sets
in a row (as a model would), so the touched experts are not served from L2 and launch gaps are
the graph's. Routing is random-uniform (the router kernel is timed separately).

    python benchmarks/bench_moe.py --preset ernie-21b-a3b [--sweep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernieserve.layers.moe import RouterConfig  # noqa: E402
from ernieserve.layers.moe import fused_moe as fm  # noqa: E402
from ernieserve.layers.moe.fused_moe import GemmTile  # noqa: E402

from gpu_timing import measure_bandwidth, time_graph  # benchmarks/gpu_timing.py

# name: (experts, top_k, hidden, moe_intermediate)
PRESETS = {
    "ernie-21b-a3b": (64, 6, 2560, 1536),
    "ernie-300b-a47b": (64, 8, 8192, 3584),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}


def measure_matmul() -> float:
    """FLOP/s of an 8192^3 bf16 matmul on random data."""
    a = torch.randn(8192, 8192, device="cuda").bfloat16()
    b = torch.randn(8192, 8192, device="cuda").bfloat16()
    ms = time_graph(lambda: a @ b, iters=20)
    return 2 * 8192**3 / (ms / 1e3)


def make_layers(num_layers: int, num_experts: int, hidden: int, inter: int):
    layers = []
    for _ in range(num_layers):
        w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") * 0.02).bfloat16()
        w2 = (torch.randn(num_experts, hidden, inter, device="cuda") * 0.02).bfloat16()
        layers.append((w13, w2))
    return layers


def routing(num_tokens: int, num_experts: int, top_k: int):
    logits = torch.randn(num_tokens, num_experts, device="cuda")
    return fm.triton_select_experts(logits, RouterConfig(num_experts, top_k, True, 1e-12, True, False), None)


def run_layers(x, layers, weights, ids, tiles=None):
    def fn() -> None:
        for w13, w2 in layers:
            fm.fused_moe_triton(x, w13, w2, weights, ids, tiles)
    return fn


GEMM_CANDIDATES = [GemmTile(bn, bk, w, st) for bn, bk, w, st in (
    (32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3),
    (128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (64, 128, 8, 4), (64, 64, 8, 4), (128, 32, 8, 4),
    (256, 64, 8, 4), (128, 128, 8, 3), (256, 32, 8, 4))]


def sweep_tiles(x, layers, weights, ids, default: fm.MoETileConfig) -> tuple[float, fm.MoETileConfig]:
    """Coordinate descent: block_m, then the gate/up tile, then the down tile (kernels are independent)."""
    def timed(tiles: fm.MoETileConfig) -> float:
        try:
            return time_graph(run_layers(x, layers, weights, ids, tiles), iters=10)
        except Exception as e:  # e.g. out of shared memory for this tile
            print(f"  skip {_fmt(tiles)}: {type(e).__name__}", file=sys.stderr)
            return float("inf")

    best = (timed(default), default)
    for bm in (16, 32, 64, 128):
        cand = fm.MoETileConfig(bm, best[1].gate_up, best[1].down)
        if bm != best[1].block_m:
            best = min(best, (timed(cand), cand), key=lambda b: b[0])
    for g in GEMM_CANDIDATES:
        cand = fm.MoETileConfig(best[1].block_m, g, best[1].down)
        best = min(best, (timed(cand), cand), key=lambda b: b[0])
    for d in GEMM_CANDIDATES:
        cand = fm.MoETileConfig(best[1].block_m, best[1].gate_up, d)
        best = min(best, (timed(cand), cand), key=lambda b: b[0])
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ernie-21b-a3b")
    ap.add_argument("--decode-tokens", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--prefill-tokens", default="4096,8192")
    ap.add_argument("--layers", type=int, default=4, help="weight sets run in a row per replay (defeats L2)")
    ap.add_argument("--sweep", action="store_true", help="also try the candidate tile configs (slow)")
    args = ap.parse_args()
    num_experts, top_k, hidden, inter = PRESETS[args.preset]
    torch.manual_seed(0)
    bw, peak = measure_bandwidth(), measure_matmul()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    layers = make_layers(args.layers, num_experts, hidden, inter)
    expert_bytes = 3 * inter * hidden * 2

    print(f"\n{args.preset}: E={num_experts} top_k={top_k} H={hidden} I={inter}  (per layer)")
    print(f"{'tokens':>7} {'experts':>7} {'MB read':>8} {'us':>8} {'floor us':>8} {'x floor':>7} {'TB/s':>6}  tiles")
    for t in [int(v) for v in args.decode_tokens.split(",") if v]:
        x = torch.randn(t, hidden, device="cuda").bfloat16()
        weights, ids = routing(t, num_experts, top_k)
        touched = int(torch.unique(ids).numel())
        nbytes = touched * expert_bytes
        ms, tiles = best_time(x, layers, weights, ids, args.sweep)
        us = ms * 1e3 / len(layers)
        floor = nbytes / bw * 1e6
        print(f"{t:>7} {touched:>7} {nbytes / 1e6:>8.1f} {us:>8.1f} {floor:>8.1f} {us / floor:>7.2f} "
              f"{nbytes / (us * 1e-6) / 1e12:>6.2f}  {tiles}")

    print(f"\n{'tokens':>7} {'ms':>8} {'TFLOP/s':>8} {'of peak':>7}  tiles")
    for t in [int(v) for v in args.prefill_tokens.split(",") if v]:
        x = torch.randn(t, hidden, device="cuda").bfloat16()
        weights, ids = routing(t, num_experts, top_k)
        ms, tiles = best_time(x, layers, weights, ids, args.sweep)
        ms /= len(layers)
        flops = 2 * t * top_k * 3 * inter * hidden
        rate = flops / (ms / 1e3)
        print(f"{t:>7} {ms:>8.3f} {rate / 1e12:>8.0f} {rate / peak:>7.0%}  {tiles}")

    print("\nper-stage us (one layer, graph replays; the weight stages read from HBM):")
    print(f"{'tokens':>7} {'topk':>7} {'topk ref':>8} {'align':>7} {'gate_up':>8} {'down':>7} {'sum':>6}")
    for t in (1, 16, 256, 4096):
        stage_breakdown(t, layers[0], top_k)


def stage_breakdown(num_tokens: int, layer, top_k: int) -> None:
    """Each launch of the fused path timed alone (graph of 20 calls, so launch gaps are the graph's)."""
    w13, w2 = layer
    num_experts, inter, hidden = w13.shape[0], w2.shape[2], w2.shape[1]
    x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
    logits = torch.randn(num_tokens, num_experts, device="cuda")
    cfg = RouterConfig(num_experts, top_k, True, 1e-12, True, True)
    bias = torch.zeros(num_experts, device="cuda")
    weights, ids = fm.triton_select_experts(logits, cfg, bias)
    tiles = fm.choose_tile_config(ids.numel(), num_experts)
    sorted_ids, block_expert, total = fm.moe_align(ids, num_experts, tiles.block_m)
    n = ids.numel()
    act = torch.empty(n, inter, dtype=x.dtype, device="cuda")
    per_slot = torch.empty(n, hidden, dtype=x.dtype, device="cuda")
    m = block_expert.shape[0]
    g, d = tiles.gate_up, tiles.down

    def gate_up() -> None:
        fm._gate_up_kernel[(m * triton.cdiv(inter, g.block_n),)](
            x, w13, act, sorted_ids, block_expert, total, n, hidden, inter, m, x.stride(0), w13.stride(0),
            w13.stride(1), TOP_K=top_k, BLOCK_M=tiles.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k,
            GROUP_M=tiles.group_m, DOT_PRECISION="tf32", DOT_FP32=False, num_warps=g.num_warps,
            num_stages=g.num_stages)

    def down() -> None:
        fm._down_kernel[(m * triton.cdiv(hidden, d.block_n),)](
            act, w2, per_slot, weights, sorted_ids, block_expert, total, n, hidden, inter, m, w2.stride(0),
            w2.stride(1), BLOCK_M=tiles.block_m, BLOCK_N=d.block_n, BLOCK_K=d.block_k, GROUP_M=tiles.group_m,
            DOT_PRECISION="tf32", DOT_FP32=False, num_warps=d.num_warps, num_stages=d.num_stages)

    from ernieserve.layers.moe.router import select_experts

    stages = [lambda: fm.triton_select_experts(logits, cfg, bias), lambda: select_experts(logits, cfg, bias),
              lambda: fm.moe_align(ids, num_experts, tiles.block_m), gate_up, down,
              lambda: per_slot.view(num_tokens, top_k, hidden).sum(dim=1)]
    us = [time_graph(_repeat(fn, 20)) * 1e3 / 20 for fn in stages]
    print(f"{num_tokens:>7} " + " ".join(f"{u:>7.1f}" for u in us))


def _repeat(fn, times: int):
    def run() -> None:
        for _ in range(times):
            fn()
    return run


def best_time(x, layers, weights, ids, sweep: bool) -> tuple[float, str]:
    default = fm.choose_tile_config(ids.numel(), layers[0][0].shape[0])
    ms = time_graph(run_layers(x, layers, weights, ids, default))
    if not sweep:
        return ms, _fmt(default)
    _, best = sweep_tiles(x, layers, weights, ids, default)
    if best == default:
        return ms, f"{_fmt(default)} (sweep found nothing faster)"
    best_us = time_graph(run_layers(x, layers, weights, ids, best)) * 1e3 / len(layers)  # full iteration count
    return ms, f"{_fmt(default)}; swept best {best_us:.1f} us with {_fmt(best)}"


def _fmt(t: fm.MoETileConfig) -> str:
    g, d = t.gate_up, t.down
    return f"M{t.block_m} gu(N{g.block_n} K{g.block_k} w{g.num_warps} s{g.num_stages}) " \
           f"dn(N{d.block_n} K{d.block_k} w{d.num_warps} s{d.num_stages})"


if __name__ == "__main__":
    main()
