"""Serving metrics from per-request timings, and the report vLLM users read.

Everything here is pure: timings in, numbers and text out, so tests can feed synthetic
timestamps. Times are seconds internally and milliseconds in the report and the JSON.

Definitions (per successful request):
- TTFT: request sent -> first chunk that carries content.
- ITL: gaps between consecutive content chunks (one entry per gap, pooled over requests).
- TPOT: (E2EL - TTFT) / (output_tokens - 1), only for requests with more than one output token.
- E2EL: request sent -> stream finished.
Failed requests count in "Failed requests" only: their tokens and timings stay out of every
throughput and latency number. They do count toward "Peak concurrent requests", since they
occupied a connection and the server while in flight.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

_LABEL_WIDTH = 40
_VALUE_WIDTH = 10
_BLOCK_WIDTH = 50


class MetricName(str, Enum):
    TTFT = "ttft"
    TPOT = "tpot"
    ITL = "itl"
    E2EL = "e2el"


_SECTION_TITLES: dict[MetricName, str] = {
    MetricName.TTFT: "Time to First Token",
    MetricName.TPOT: "Time per Output Token (excl. 1st token)",
    MetricName.ITL: "Inter-token Latency",
    MetricName.E2EL: "End-to-end Latency",
}


@dataclass(slots=True)
class RequestResult:
    """What one request produced. Times in seconds; ``start_time`` from the benchmark's start."""

    prompt_len: int
    success: bool = False
    output_tokens: int | None = None  # from the usage chunk; None until counted
    generated_text: str = ""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2EL on success, time until the failure otherwise
    start_time: float = 0.0
    error: str = ""

    def content_chunk_times(self) -> list[float]:
        """Arrival times (since the benchmark's start) of the chunks that carried content."""
        first = self.start_time + self.ttft
        return [first, *(first + t for t in np.cumsum(self.itl).tolist())]


@dataclass(slots=True)
class MetricStats:
    """One latency metric in milliseconds; ``percentiles`` pairs (p, value)."""

    mean: float
    median: float
    std: float
    percentiles: list[tuple[float, float]]


@dataclass(slots=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    duration: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    peak_output_throughput: float
    peak_concurrent_requests: int
    stats: dict[MetricName, MetricStats]
    errors: Counter[str]


def parse_metric_names(text: str) -> list[MetricName]:
    """``"ttft,tpot,itl"`` -> the enum members, with a readable error on an unknown name."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    valid = {m.value for m in MetricName}
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown metric {name!r}; choose from {sorted(valid)}")
    return [MetricName(name) for name in names]


def parse_percentiles(text: str) -> list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    for value in values:
        if not 0.0 < value <= 100.0:
            raise ValueError(f"metric percentile must be in (0, 100], got {value}")
    return values


def compute_metrics(results: list[RequestResult], duration: float,
                    percentiles: list[float]) -> BenchmarkMetrics:
    """Aggregate per-request results; ``output_tokens`` must be filled for successful ones."""
    ok = [r for r in results if r.success]
    output_lens = [r.output_tokens or 0 for r in ok]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(output_lens)
    samples: dict[MetricName, list[float]] = {
        MetricName.TTFT: [r.ttft for r in ok],
        MetricName.TPOT: [(r.latency - r.ttft) / (n - 1) for r, n in zip(ok, output_lens) if n > 1],
        MetricName.ITL: [gap for r in ok for gap in r.itl],
        MetricName.E2EL: [r.latency for r in ok],
    }
    safe_duration = duration if duration > 0 else math.inf
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(results) - len(ok),
        total_input=total_input,
        total_output=total_output,
        duration=duration,
        request_throughput=len(ok) / safe_duration,
        output_throughput=total_output / safe_duration,
        total_token_throughput=(total_input + total_output) / safe_duration,
        peak_output_throughput=peak_output_throughput(ok),
        peak_concurrent_requests=peak_concurrency(results),
        stats={name: summarize_ms(values, percentiles) for name, values in samples.items()},
        errors=Counter(r.error for r in results if not r.success),
    )


def summarize_ms(values_s: list[float], percentiles: list[float]) -> MetricStats:
    """Mean, median, std and percentiles (linear interpolation) in ms; zeros when empty."""
    if not values_s:
        return MetricStats(0.0, 0.0, 0.0, [(p, 0.0) for p in percentiles])
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    return MetricStats(
        mean=float(np.mean(ms)),
        median=float(np.median(ms)),
        std=float(np.std(ms)),
        percentiles=[(p, float(np.percentile(ms, p))) for p in percentiles],
    )


def peak_output_throughput(successful: list[RequestResult]) -> float:
    """Most output tokens that arrived within one 1-second bucket [k, k+1) of the run.

    A chunk's tokens are output_tokens / content_chunks, so a server that packs several tokens
    into one chunk is counted by its tokens, not its chunks.
    """
    buckets: Counter[int] = Counter()
    for result in successful:
        times = result.content_chunk_times()
        tokens = len(times) if result.output_tokens is None else result.output_tokens
        weight = tokens / len(times)
        for t in times:
            buckets[math.floor(t)] += weight
    return max(buckets.values(), default=0.0)


def peak_concurrency(results: list[RequestResult]) -> int:
    """Most requests in flight at one instant (sweep over start/end events)."""
    # At equal times an end sorts before a start: back-to-back requests are not concurrent.
    events = sorted(
        [(r.start_time, 1) for r in results] + [(r.start_time + r.latency, -1) for r in results]
    )
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


# --------------------------------------------------------------------------------------------
# report


def _line(label: str, value: object, fmt: str = "") -> str:
    return f"{label:<{_LABEL_WIDTH}} {value:<{_VALUE_WIDTH}{fmt}}"


def _banner(title: str, fill: str) -> str:
    return f"{title:{fill}^{_BLOCK_WIDTH}}"


def format_report(metrics: BenchmarkMetrics, request_rate: float, max_concurrency: int | None,
                  selected: list[MetricName]) -> str:
    """The "Serving Benchmark Result" block in vLLM's layout."""
    lines = [_banner(" Serving Benchmark Result ", "="),
             _line("Successful requests:", metrics.completed),
             _line("Failed requests:", metrics.failed)]
    if max_concurrency is not None:
        lines.append(_line("Maximum request concurrency:", max_concurrency))
    lines += [
        _line("Request rate configured (RPS):", request_rate, ".2f"),
        _line("Benchmark duration (s):", metrics.duration, ".2f"),
        _line("Total input tokens:", metrics.total_input),
        _line("Total generated tokens:", metrics.total_output),
        _line("Request throughput (req/s):", metrics.request_throughput, ".2f"),
        _line("Output token throughput (tok/s):", metrics.output_throughput, ".2f"),
        _line("Peak output token throughput (tok/s):", metrics.peak_output_throughput, ".2f"),
        _line("Peak concurrent requests:", metrics.peak_concurrent_requests),
        _line("Total Token throughput (tok/s):", metrics.total_token_throughput, ".2f"),
    ]
    for name in selected:
        lines += _metric_section(name, metrics.stats[name])
    lines.append("=" * _BLOCK_WIDTH)
    return "\n".join(lines)


def _metric_section(name: MetricName, stats: MetricStats) -> list[str]:
    short = name.value.upper()
    lines = [_banner(_SECTION_TITLES[name], "-"),
             _line(f"Mean {short} (ms):", stats.mean, ".2f"),
             _line(f"Median {short} (ms):", stats.median, ".2f")]
    for p, value in stats.percentiles:
        lines.append(_line(f"P{_percentile_label(p)} {short} (ms):", value, ".2f"))
    return lines


def _percentile_label(p: float) -> str:
    return str(int(p)) if p == int(p) else str(p)


def metrics_to_dict(metrics: BenchmarkMetrics, selected: list[MetricName]) -> dict[str, object]:
    """Flat JSON-ready numbers, with vLLM's key names (mean_ttft_ms, p99_itl_ms, ...)."""
    out: dict[str, object] = {
        "duration": metrics.duration,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "max_output_tokens_per_s": metrics.peak_output_throughput,
        "max_concurrent_requests": metrics.peak_concurrent_requests,
    }
    for name in selected:
        stats = metrics.stats[name]
        key = name.value
        out[f"mean_{key}_ms"] = stats.mean
        out[f"median_{key}_ms"] = stats.median
        out[f"std_{key}_ms"] = stats.std
        for p, value in stats.percentiles:
            out[f"p{_percentile_label(p)}_{key}_ms"] = value
    return out
