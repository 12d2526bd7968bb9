"""benchmarks/trace_gaps.py on a hand-made Chrome trace: busy time as the union of overlapping
kernels, device time by launching call, and idle gaps marked host-late when the next launch came late."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trace_gaps.py"


@pytest.fixture(scope="module")
def trace_gaps():
    spec = importlib.util.spec_from_file_location("trace_gaps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["trace_gaps"] = module  # its dataclass resolves annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["trace_gaps"]


def _trace(tmp_path: Path) -> Path:
    def runtime(name, ts, corr):
        return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": 1, "args": {"correlation": corr}}

    def device(name, ts, dur, corr, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    events = [
        runtime("cudaMemcpyAsync", 0, 1), device("Memcpy HtoD", 2, 3, 1, "gpu_memcpy"),  # 2..5
        runtime("cudaGraphLaunch", 1, 2),
        device("norm", 10, 10, 2),   # 10..20: gap of 5 after the copy, launched early: device-side
        device("gemm", 18, 12, 2),   # 18..30 overlaps the norm (PDL): busy 10..30
        runtime("cudaLaunchKernel", 40, 3), device("argmax", 45, 5, 3),  # gap 30..45, launched at 40 > 30: host-late
        {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 0, "dur": 50},  # not device work
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_union_launchers_and_gaps(trace_gaps, tmp_path: Path) -> None:
    acts = trace_gaps.load(str(_trace(tmp_path)))
    assert [a.name for a in acts] == ["Memcpy HtoD", "norm", "gemm", "argmax"]
    assert acts[1].launcher == "cudaGraphLaunch" and acts[3].launch_ts == 40
    report = trace_gaps.analyse(acts, steps=1, min_gap_us=3.0, rows=10)
    lines = report.splitlines()
    # window 2..50 = 48 µs; busy 3 + 20 + 5 = 28; idle 20
    assert "window 0.048 ms/step: busy 0.028 ms, idle 0.020 ms (41.7%)" in lines[0]
    assert any(line.split() == ["0.022", "cudaGraphLaunch"] for line in lines)  # 10 + 12, overlap counted twice
    assert "  0.0050  Memcpy HtoD  ->  norm" in report  # the host had launched the graph before the gap
    assert "host-late gemm  ->  argmax" in report
    assert "1.0x   0.0050  argmax" in report  # outside the graphs


def test_two_steps_halve_the_figures(trace_gaps, tmp_path: Path) -> None:
    acts = trace_gaps.load(str(_trace(tmp_path)))
    assert "window 0.024 ms/step: busy 0.014 ms" in trace_gaps.analyse(acts, steps=2, min_gap_us=3.0, rows=10)


def test_empty_trace(trace_gaps, tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text(json.dumps([]))
    assert "no device activity" in trace_gaps.analyse(trace_gaps.load(str(path)), 1, 3.0, 10)
