"""Metric math on synthetic timestamps, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from ernieserve.bench.metrics import (
    MetricName, RequestResult, compute_metrics, format_report, metrics_to_dict,
    parse_metric_names, parse_percentiles,
)


def _percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks, written out."""
    ordered = sorted(values)
    pos = p / 100 * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _results() -> list[RequestResult]:
    return [
        # 4 tokens in 4 chunks at 0.10, 0.12, 0.15, 0.20 (bucket 0)
        RequestResult(prompt_len=10, success=True, output_tokens=4, ttft=0.10,
                      itl=[0.02, 0.03, 0.05], latency=0.20, start_time=0.0),
        # 2 tokens at 1.20, 1.30 (bucket 1)
        RequestResult(prompt_len=20, success=True, output_tokens=2, ttft=0.30, itl=[0.10],
                      latency=0.45, start_time=0.90),
        # 1 token at 0.25 (bucket 0); starts exactly when the first one ends
        RequestResult(prompt_len=30, success=True, output_tokens=1, ttft=0.05, itl=[],
                      latency=0.05, start_time=0.20),
        # failed after 0.3 s: counted, excluded from tokens and latencies
        RequestResult(prompt_len=1000, success=False, latency=0.30, start_time=0.10,
                      error="HTTP 500: boom"),
        RequestResult(prompt_len=1000, success=False, latency=0.01, start_time=1.0,
                      error="HTTP 500: boom"),
    ]


def test_counts_and_throughputs() -> None:
    m = compute_metrics(_results(), duration=2.0, percentiles=[50, 99])
    assert (m.completed, m.failed) == (3, 2)
    assert m.total_input == 60  # failed prompts are not counted
    assert m.total_output == 7
    assert m.request_throughput == pytest.approx(3 / 2.0)
    assert m.output_throughput == pytest.approx(7 / 2.0)
    assert m.total_token_throughput == pytest.approx(67 / 2.0)
    assert m.errors["HTTP 500: boom"] == 2


def test_latency_stats_by_hand() -> None:
    m = compute_metrics(_results(), duration=2.0, percentiles=[50, 99])
    ttfts = [0.10, 0.30, 0.05]
    tpots = [(0.20 - 0.10) / 3, (0.45 - 0.30) / 1]  # the 1-token request has no TPOT
    itls = [0.02, 0.03, 0.05, 0.10]
    e2els = [0.20, 0.45, 0.05]
    expected = {MetricName.TTFT: ttfts, MetricName.TPOT: tpots, MetricName.ITL: itls,
                MetricName.E2EL: e2els}
    for name, values in expected.items():
        stats = m.stats[name]
        ms = [v * 1000 for v in values]
        assert stats.mean == pytest.approx(sum(ms) / len(ms)), name
        assert stats.median == pytest.approx(_percentile(ms, 50)), name
        assert dict(stats.percentiles)[99] == pytest.approx(_percentile(ms, 99)), name
    # spot values: TTFT median 100 ms, ITL mean 50 ms, P99 ITL = 50 + 0.97*50
    assert m.stats[MetricName.TTFT].median == pytest.approx(100.0)
    assert m.stats[MetricName.ITL].mean == pytest.approx(50.0)
    assert dict(m.stats[MetricName.ITL].percentiles)[99] == pytest.approx(98.5)


def test_peaks() -> None:
    m = compute_metrics(_results(), duration=2.0, percentiles=[99])
    assert m.peak_output_throughput == pytest.approx(5.0)  # 4 + 1 tokens in [0, 1)
    # in flight: [0,0.2] [0.9,1.35] [0.2,0.25] [0.1,0.4] [1.0,1.01] -> at most 2 at once;
    # back-to-back at 0.2 does not overlap
    assert m.peak_concurrent_requests == 2


def test_peak_counts_tokens_not_chunks() -> None:
    packed = RequestResult(prompt_len=1, success=True, output_tokens=6, ttft=0.1,
                           itl=[0.1, 0.1], latency=0.3, start_time=0.0)  # 3 chunks, 2 tokens each
    m = compute_metrics([packed], duration=1.0, percentiles=[99])
    assert m.peak_output_throughput == pytest.approx(6.0)


def test_all_failed_gives_zeros() -> None:
    results = [RequestResult(prompt_len=5, error="ClientConnectorError: refused", latency=0.001)]
    m = compute_metrics(results, duration=0.5, percentiles=[99])
    assert (m.completed, m.failed, m.total_output) == (0, 1, 0)
    assert m.request_throughput == 0.0 and m.peak_output_throughput == 0.0
    assert m.stats[MetricName.TTFT].mean == 0.0
    text = format_report(m, math.inf, None, [MetricName.TTFT])
    assert "Failed requests:                         1" in text
    assert "Request rate configured (RPS):           inf" in text


def test_report_layout() -> None:
    m = compute_metrics(_results(), duration=2.0, percentiles=[99, 99.9])
    text = format_report(m, 10.0, 4, [MetricName.TTFT, MetricName.TPOT, MetricName.ITL,
                                      MetricName.E2EL])
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[1] == "Successful requests:                     3         "
    assert lines[2] == "Failed requests:                         2         "
    assert lines[3] == "Maximum request concurrency:             4         "
    assert lines[4] == "Request rate configured (RPS):           10.00     "
    assert "---------------Time to First Token----------------" in lines
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    assert "---------------Inter-token Latency----------------" in lines
    assert "----------------End-to-end Latency----------------" in lines
    assert lines[-1] == "=" * 50
    assert "Median TTFT (ms):                        100.00    " in lines
    assert any(line.startswith("P99.9 ITL (ms):") for line in lines)
    labels = [line[:40].rstrip() for line in lines[1:13]]
    assert labels == [
        "Successful requests:", "Failed requests:", "Maximum request concurrency:",
        "Request rate configured (RPS):", "Benchmark duration (s):", "Total input tokens:",
        "Total generated tokens:", "Request throughput (req/s):",
        "Output token throughput (tok/s):", "Peak output token throughput (tok/s):",
        "Peak concurrent requests:", "Total Token throughput (tok/s):",
    ]
    no_concurrency = format_report(m, 10.0, None, [MetricName.TTFT])
    assert "Maximum request concurrency" not in no_concurrency
    assert "Inter-token Latency" not in no_concurrency


def test_metrics_to_dict_keys() -> None:
    m = compute_metrics(_results(), duration=2.0, percentiles=[99])
    d = metrics_to_dict(m, [MetricName.TTFT, MetricName.ITL])
    assert d["completed"] == 3 and d["failed"] == 2 and d["total_output_tokens"] == 7
    assert {"mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "p99_itl_ms"} <= set(d)
    assert "mean_tpot_ms" not in d


def test_parsers() -> None:
    assert parse_metric_names("ttft, e2el") == [MetricName.TTFT, MetricName.E2EL]
    assert parse_percentiles("50,99.9") == [50.0, 99.9]
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metric_names("ttft,latency")
    with pytest.raises(ValueError):
        parse_percentiles("0")
