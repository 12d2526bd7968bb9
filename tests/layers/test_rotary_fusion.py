"""The attention layer's fused path (rotary + KV store in one kernel) gives the unfused path's tokens.

On CPU the fused path is off (it is for CUDA tensors); here `kernel_tables` is made to accept CPU
tensors and the Triton attention backend runs interpreted, so the whole engine runs the fused
wiring: ERNIE (adjacent pairs), Qwen3 (halves, after q/k norms) and ERNIE-VL (3-D positions).
"""

from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ:
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)", allow_module_level=True)
pytest.importorskip("triton")

from ernieserve import LLM, SamplingParams  # noqa: E402
from ernieserve.layers.mrope import ErnieMRotaryEmbedding  # noqa: E402
from ernieserve.layers.rotary import RotaryEmbedding  # noqa: E402
from ernieserve.worker import model_runner  # noqa: E402

pytestmark = pytest.mark.slow  # interpreted attention kernels


def _tokens(model, monkeypatch, fused: bool) -> list[list[int]]:
    from ernieserve.attention.triton_attn import TritonAttentionBackend

    monkeypatch.setattr(model_runner, "select_attention_backend", lambda device: TritonAttentionBackend())
    monkeypatch.setattr(TritonAttentionBackend, "fuses_rotary", fused)
    calls = {"n": 0}

    def on_cpu(self, positions, q=None, k=None):  # kernel_tables without its CUDA check (CPU tensors here)
        calls["n"] += 1
        if isinstance(self, ErnieMRotaryEmbedding):
            cos, sin = self.token_tables(positions)
            return torch.arange(positions.shape[-1]), cos, sin
        return positions, self.cos, self.sin

    monkeypatch.setattr(RotaryEmbedding, "kernel_tables", on_cpu)
    monkeypatch.setattr(ErnieMRotaryEmbedding, "kernel_tables", on_cpu)
    llm = LLM(model=str(model), enforce_eager=True, max_model_len=128, max_num_seqs=4, block_size=16,
              num_gpu_blocks_override=32, max_num_batched_tokens=16)
    prompts = [{"prompt_token_ids": [5 + i, 17, 29, 41 + i] + list(range(60, 60 + 5 * i))} for i in range(3)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert (calls["n"] > 0) == fused
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("preset", ["tiny-ernie-4.5", "tiny-qwen3", "tiny-ernie-4.5-vl"])
def test_fused_rotary_and_store_equal_the_two_steps(checkpoint_factory, monkeypatch, preset):
    model = checkpoint_factory(preset)
    assert _tokens(model, monkeypatch, True) == _tokens(model, monkeypatch, False)
