"""GPU tests build several engines in one process (the `tests` stage of benchmarks/gpu_session.sh
runs the whole suite at once): free each test's device memory before the next one sizes its KV
cache from what is free. An engine's objects hold reference cycles, which `del` alone leaves to
the next garbage collection."""

from __future__ import annotations

import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def _free_device_memory():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
