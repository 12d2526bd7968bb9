"""Sizing the device KV cache (worker/kv_cache.py), with the CUDA memory queries stubbed."""

from __future__ import annotations

import pytest
import torch

from ernieserve.config import EngineArgs
from ernieserve.worker import kv_cache

GiB = 2**30


@pytest.fixture
def config(tiny_ernie):
    return EngineArgs(model=str(tiny_ernie), gpu_memory_utilization=0.9).create_engine_config()


def _device(monkeypatch, free: float, total: float, reserved: float, allocated: float) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free * GiB), int(total * GiB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(reserved * GiB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(allocated * GiB))


def test_budget_is_utilization_minus_the_profiled_peak(config, monkeypatch):
    _device(monkeypatch, free=70, total=80, reserved=10, allocated=10)
    budget = kv_cache.gpu_kv_budget(config, torch.device("cpu"), peak_bytes=12 * GiB)
    assert budget == int(80 * GiB * 0.9) - 12 * GiB


def test_budget_never_exceeds_what_the_driver_still_has_free(config, monkeypatch, caplog):
    """The 21B-A3B case on an H100: 12 GiB of the allocator's blocks were fragments it could not
    return, so the formula's 26.7 GiB cache failed to allocate with 24.7 GiB free."""
    _device(monkeypatch, free=24.7, total=79.18, reserved=54.47, allocated=41.97)
    pool = 2 * GiB
    with caplog.at_level("INFO", logger="ernieserve.worker.kv_cache"):
        budget = kv_cache.gpu_kv_budget(config, torch.device("cpu"), peak_bytes=44 * GiB + pool,
                                        graph_pool_bytes=pool)
    assert budget == int(24.7 * GiB) - pool - kv_cache._FREE_MARGIN
    assert "fragments" in caplog.text

