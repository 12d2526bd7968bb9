"""ERNIE 4.5 VL through the engine on a GPU: Triton attention, CUDA graphs with [3, bs] positions,
the vision encoder on the device, against HF transformers' greedy tokens (fp32, tiny checkpoint)."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_vl_engine import MAX_TOKENS, expected, run_engine  # noqa: F401  (fixtures)
from tests.models.test_vl_parity import ckpt, hf, prompts  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("eager", [False, True], ids=["cuda-graphs", "eager"])
def test_vl_engine_on_gpu_matches_hf(ckpt, prompts, expected, eager):  # noqa: F811
    reqs = [(f"r{i}", p) for i, p in enumerate(prompts)]
    got, core = run_engine(ckpt, reqs, device="cuda", dtype="float32", enforce_eager=eager,
                           max_num_batched_tokens=8, max_num_seqs=4)
    assert [got[f"r{i}"] for i in range(len(prompts))] == expected
