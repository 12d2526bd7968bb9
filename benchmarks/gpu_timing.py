"""Timing helpers shared by the benchmark scripts (run them as `python3 benchmarks/NAME.py`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def time_graph(fn: Callable[[], object], iters: int = 30, replays: int = 5) -> float:
    """Median milliseconds of one replay of a CUDA graph that calls fn()."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture (Triton compiles, allocator settles)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # several replays per sample: the GPU stays busy while the host submits the next one, so
        # the host's launch latency is not counted as device time
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def measure_bandwidth(iters: int = 20) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting read + write."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_graph(lambda: dst.copy_(src), iters=iters) / 1e3)


def time_graph_within(fn: Callable[[], object], budget_ms: float = 300.0) -> float:
    """time_graph with the iteration count fitted to a time budget: a rough first estimate, then
    as many samples as fit (3 to 30), so slow shapes cannot stall a whole benchmark run."""
    estimate = time_graph(fn, iters=2, replays=1)
    replays = 5 if estimate < 2.0 else 1
    iters = int(max(3, min(30, budget_ms / max(estimate * replays, 1e-3))))
    return time_graph(fn, iters=iters, replays=replays)
