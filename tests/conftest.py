"""Shared fixtures: tiny random-weight checkpoints written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run in its interpreter on machines without CUDA. Triton reads this once, at its
# first import, so it is set here before any test module can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def make(preset: str) -> Path:
        if preset not in made:
            from ernieserve.checkpoint.dummy import write_dummy_checkpoint

            out = tmp_path_factory.mktemp(preset)
            made[preset] = Path(write_dummy_checkpoint(preset, out, dtype="float32"))
        return made[preset]

    return make


@pytest.fixture(scope="session")
def tiny_ernie(checkpoint_factory) -> Path:
    return checkpoint_factory("tiny-ernie-4.5")
