"""Step statistics (ERNIESERVE_STEP_STATS=1) and the torch.profiler window (ERNIESERVE_PROFILE_STEPS)."""

from __future__ import annotations

import logging

import pytest

from ernieserve import LLM, SamplingParams
from ernieserve.engine.step_stats import StepProfiler, report_step_stats


def test_step_stats_count_every_step_by_kind(tiny_ernie, monkeypatch):
    monkeypatch.setenv("ERNIESERVE_STEP_STATS", "1")
    llm = LLM(model=str(tiny_ernie), max_num_batched_tokens=64, max_num_seqs=8)
    prompts = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (40, 50, 60)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    rows = llm.llm_engine.core.step_stats.as_dict()
    # 150 prompt tokens at 64 a step: three steps hold prefill chunks (some with decodes)
    assert rows["mixed"]["steps"] == 3
    assert rows["mixed"]["tokens"] + rows["decode-eager"]["tokens"] == 150 + 3 * 5
    assert all(rows[k]["total_ms"] >= rows[k]["forward_ms"] > 0 for k in ("mixed", "decode-eager"))
    text = report_step_stats(llm)
    assert "decode-eager" in text and "mixed" in text


def test_step_stats_off_by_default(tiny_ernie, monkeypatch):
    monkeypatch.delenv("ERNIESERVE_STEP_STATS", raising=False)
    llm = LLM(model=str(tiny_ernie))
    assert llm.llm_engine.core.step_stats is None and report_step_stats(llm) is None


def test_profiler_window_logs_the_busiest_ops(tiny_ernie, monkeypatch, caplog):
    monkeypatch.setenv("ERNIESERVE_PROFILE_STEPS", "1:2")
    llm = LLM(model=str(tiny_ernie))
    with caplog.at_level(logging.INFO, logger="ernieserve.engine.step_stats"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=5, ignore_eos=True),
                     use_tqdm=False)
    assert any("torch.profiler over steps 1..2" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("spec", ["5", "a:b", "3:0", "-1:2"])
def test_profiler_window_must_be_start_colon_count(spec):
    with pytest.raises(ValueError, match="START:COUNT"):
        StepProfiler(spec)


def test_device_spans_are_averaged_by_the_kind_of_step_they_belong_to():
    """Spans arrive one call late (read back with the step's ids): each counts for its own kind."""
    from ernieserve.engine.step_stats import StepStats, StepTimes

    stats = StepStats()
    stats.record(StepTimes("mixed", 100, 4, {"forward": 0.01}), 0.001, 0.001, 0.02)
    stats.record(StepTimes("decode-graph", 4, 4, {"forward": 0.001}, [("mixed", 30.0)]), 0.0, 0.0, 0.003)
    stats.record(StepTimes("decode-graph", 4, 4, {"forward": 0.001}, [("decode-graph", 1.0)]), 0.0, 0.0, 0.003)
    stats.record(StepTimes("decode-graph", 4, 4, {"forward": 0.001}, [("decode-graph", 2.0)]), 0.0, 0.0, 0.003)
    rows = stats.as_dict()
    assert rows["mixed"]["device_ms"] == 30.0 and rows["decode-graph"]["device_ms"] == 1.5
    assert rows["mixed"]["steps"] == 1 and rows["decode-graph"]["steps"] == 3
    assert "device" in stats.summary().splitlines()[1]
