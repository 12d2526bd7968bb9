"""Times the quantized GEMMs against bf16 and against the bytes floor, on one GPU.

For each projection shape of a preset and each token count, every method runs one CUDA graph
that applies the layer over `--copies` different weight sets in a row (so weights come from HBM,
not L2, as in a model), and the script prints per-layer time, the ratio to bf16 (`F.linear`),
the bytes floor (weight + activation bytes at the measured copy bandwidth) and, for prefill
shapes, TFLOP/s. Decode shapes should sit near the floor (wint8 ~0.5x and wint4 ~0.27x of bf16's
bytes); prefill shapes should keep at least 70% of bf16's throughput.

Bounded run time (an earlier version never finished inside a 10-minute device command: 512 MiB of
weight copies per graph, 150 replays per row, 8192-token GEMMs through torch's decode-only
int4pack / int8pack kernels): copies fill 256 MiB only for decode token counts (<= 32; larger
ones are compute bound and run 2 copies), each row's iteration count is fitted to a time budget
(`time_graph_within`), and rows past `--budget-s` (default 7 minutes) are printed as skipped, so a
run ends within the budget plus one row (not yet timed on the GPU after this change).

Methods: bf16; wint8 / wint4 / wint4-g128 through Triton; wint8 and wint4-g128 through torch's
int8pack / int4pack GEMMs; block_wise_fp8, fp8 through Triton and fp8 through torch._scaled_mm
(Hopper only; activation quantization included in the time).

    python benchmarks/bench_quant.py --preset ernie-21b-a3b [--tokens 1 8 32 512 4096] [--budget-s 420]

The table decides `GemmBackend` defaults (TODO in ernieserve/kernels/quant_matmul.py): put the
results in docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernieserve.kernels import fp8_matmul as f8  # noqa: E402
from ernieserve.kernels import quant_matmul as qm  # noqa: E402

from gpu_timing import measure_bandwidth, time_graph_within  # benchmarks/gpu_timing.py

# preset -> [(projection, N, K)]
PRESETS = {
    "ernie-0.3b": [("qkv", 2560, 1024), ("o", 1024, 2048), ("gate_up", 6144, 1024), ("down", 1024, 3072)],
    "ernie-21b-a3b": [("qkv", 3584, 2560), ("o", 2560, 2560), ("dense gate_up", 24576, 2560),
                      ("dense down", 2560, 12288), ("shared gate_up", 6144, 2560), ("shared down", 2560, 3072)],
    "ernie-300b-a47b": [("qkv", 10240, 8192), ("o", 8192, 8192), ("dense gate_up", 57344, 8192),
                        ("dense down", 8192, 28672)],
}
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@dataclass
class Method:
    name: str
    make: Callable[[torch.Tensor], tuple]  # bf16 weight [N, K] -> prepared weight tensors
    run: Callable[[torch.Tensor, tuple], torch.Tensor]  # (x, prepared) -> y


def _weight_only(bits: int, group: int) -> Method:
    quantize = qm.quantize_int8 if bits == 8 else qm.quantize_int4
    return Method(f"wint{bits}{f'-g{group}' if group else ''} triton", lambda w: quantize(w, group),
                  lambda x, p: qm.weight_only_matmul(x, p[0], p[1], bits, group))


def _int8pack() -> Method:
    return Method("wint8 torch", lambda w: qm.quantize_int8(w, 0), lambda x, p: qm.int8pack_matmul(x, p[0], p[1]))


def _int4pack(group: int) -> Method:
    def make(w: torch.Tensor) -> tuple:
        q, s = qm.quantize_int4(w, group)
        return qm.to_int4pack(q, s, w.shape[1], group, torch.bfloat16)
    return Method(f"wint4-g{group} torch", make, lambda x, p: qm.int4pack_matmul(x, p[0], p[1], p[2]))


def _fp8(block_wise: bool, torch_backend: bool = False) -> Method:
    quantize = f8.quantize_fp8_blockwise if block_wise else f8.quantize_fp8_per_channel
    group = f8.SCALE_BLOCK if block_wise else 0

    def run(x: torch.Tensor, p: tuple) -> torch.Tensor:
        xq, xs = f8.quant_fp8_per_token_group(x, group)
        if torch_backend:
            return f8.scaled_mm_per_channel(xq, xs, p[0], p[1], x.dtype)
        tiles = f8.fp8_tiles(x.shape[0], p[0].shape[0], x.shape[1], x.device)
        return f8.fp8_matmul(xq, xs, p[0], p[1], block_wise, x.dtype, tiles=tiles)
    name = ("block_wise_fp8" if block_wise else "fp8") + (" torch" if torch_backend else " triton")
    return Method(name, quantize, run)


def methods() -> list[Method]:
    out = [Method("bf16", lambda w: (w,), lambda x, p: torch.nn.functional.linear(x, p[0])),
           _weight_only(8, 0), _int8pack(), _weight_only(4, 0), _weight_only(4, 128), _int4pack(128)]
    if HOPPER:
        out += [_fp8(True), _fp8(False), _fp8(False, torch_backend=True)]
    return out


def weight_bytes(prepared: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in prepared if isinstance(t, torch.Tensor))


DECODE_MAX_TOKENS = 32  # token counts up to this are memory bound: they need the copies that defeat L2
PREFILL_COPIES = 2


def bench_shape(n: int, k: int, tokens: list[int], copies: int, bandwidth: float, deadline: float) -> Iterator[str]:
    """Markdown rows, yielded as measured (a run cut short still prints what it has)."""
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    bf16_ms: dict[int, float] = {}
    for method in methods():
        try:
            prepared = [method.make(w) for w in weights]
        except (RuntimeError, ValueError) as e:
            yield f"| {n}x{k} | - | {method.name} | n/a: {str(e).splitlines()[0][:60]} | | | | |"
            continue
        wbytes = weight_bytes(prepared[0])
        for m in tokens:
            if time.monotonic() > deadline:
                yield f"| {n}x{k} | {m} | {method.name} | skipped: --budget-s reached | | | | |"
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            used = prepared if m <= DECODE_MAX_TOKENS else prepared[:PREFILL_COPIES]
            try:
                ms = time_graph_within(lambda: [method.run(x, p) for p in used]) / len(used)
            except RuntimeError as e:
                yield f"| {n}x{k} | {m} | {method.name} | error: {str(e).splitlines()[0][:60]} | | | | |"
                continue
            if method.name == "bf16":
                bf16_ms[m] = ms
            floor_ms = (wbytes + 2 * m * (k + n)) / bandwidth * 1e3
            tflops = 2 * m * n * k / (ms / 1e3) / 1e12
            vs_bf16 = f"{ms / bf16_ms[m]:.2f}x" if m in bf16_ms else "-"
            yield (f"| {n}x{k} | {m} | {method.name} | {ms * 1e3:.1f} | {vs_bf16} | "
                   f"{floor_ms * 1e3:.1f} | {ms / floor_ms:.2f}x | {tflops:.1f} |")
        prepared = []  # free this method's weights before the next one quantizes its own
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ernie-21b-a3b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 512, 4096])
    parser.add_argument("--copies", type=int, default=0,
                        help="weight sets per graph at decode token counts (default: enough for 256 MiB of "
                             "bf16, to defeat L2; larger token counts use 2)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop measuring after this many seconds (later rows say skipped)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    bandwidth = measure_bandwidth()
    print(f"# {torch.cuda.get_device_name()} ({args.preset}), copy bandwidth {bandwidth / 1e12:.2f} TB/s\n")
    print("| N x K | tokens | method | us/layer | vs bf16 | floor us | vs floor | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, k in PRESETS[args.preset]:
        copies = args.copies or max(2, min(16, (256 << 20) // (2 * n * k)))
        print(f"| **{name}** | | | | | | | |")
        for row in bench_shape(n, k, args.tokens, copies, bandwidth, deadline):
            print(row, flush=True)


if __name__ == "__main__":
    main()
