"""ERNIESERVE_FUSED_QKV_ROPE at model level: a one-token decode step whose qkv projections rotate and
store K/V themselves (kernels/gemv.py `gemv_rope_store`) gives the unfused step's logits and KV
cache, bit for bit.

The fused path is for CUDA (the one-row GEMV with PDL, the Triton attention backend's tables). Here,
on CPU with the Triton kernels interpreted, the GEMV policy and the rotary tables are made to accept
CPU tensors and the dense linears take the GEMV for one row as on CUDA, so both steps run the GPU's
decode code: `gemv` + `apply_rotary_and_store_kv_` against `gemv_rope_store`.
"""

from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ:
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)", allow_module_level=True)
pytest.importorskip("triton")

from ernieserve.attention.triton_attn import TritonAttentionBackend  # noqa: E402
from ernieserve.config import EngineArgs  # noqa: E402
from ernieserve.kernels import gemv  # noqa: E402
from ernieserve.layers.linear import UnquantizedLinearMethod  # noqa: E402
from ernieserve.layers.rotary import RotaryEmbedding  # noqa: E402
from ernieserve.sampling_params import SamplingParams  # noqa: E402
from ernieserve.worker.input_batch import CachedRequestState, build_step_inputs  # noqa: E402
from ernieserve.worker.model_runner import ModelRunner  # noqa: E402


@pytest.fixture
def cuda_decode_on_cpu(monkeypatch: pytest.MonkeyPatch):
    """The CUDA decode path's choices on CPU tensors; yields a counter of fused projections."""

    def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:  # gemv.use_gemv less its CUDA / PDL check
        return x.numel() // x.shape[-1] == 1 and x.dtype == weight.dtype and gemv.gemv_supported(weight)

    def apply(self, layer, x, bias):  # UnquantizedLinearMethod.apply less its CUDA check
        if gemv.use_gemv(x, layer.weight):
            return gemv.gemv(x, layer.weight, bias)
        return torch.nn.functional.linear(x, layer.weight, bias)

    def kernel_tables(self, positions, q=None, k=None):  # RotaryEmbedding.kernel_tables less its CUDA check
        return (positions, self.cos, self.sin) if positions.dim() == 1 else None

    calls = {"fused": 0}
    real = gemv.gemv_rope_store

    def counted(*args, **kwargs):
        calls["fused"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(gemv, "use_gemv", use_gemv)
    monkeypatch.setattr(UnquantizedLinearMethod, "apply", apply)
    monkeypatch.setattr(RotaryEmbedding, "kernel_tables", kernel_tables)
    monkeypatch.setattr(gemv, "gemv_rope_store", counted)
    # tiny-ernie's K = 64: 4 rows a program, so a program stays within a 16-wide head
    monkeypatch.setattr(gemv, "SLICE_BYTES", 4 * 64 * 2)
    yield calls
    gemv.fused_qkv_rope_enabled.cache_clear()


def _switch(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setenv("ERNIESERVE_FUSED_QKV_ROPE", "1" if on else "0")
    gemv.fused_qkv_rope_enabled.cache_clear()


@torch.inference_mode()
def test_fused_decode_step_equals_unfused(tiny_ernie, monkeypatch, cuda_decode_on_cpu) -> None:
    config = EngineArgs(model=str(tiny_ernie), device="cpu", dtype="bfloat16", num_gpu_blocks_override=8,
                        block_size=16, max_model_len=128).create_engine_config()
    runner = ModelRunner(config, backend=TritonAttentionBackend())
    runner.initialize_kv_cache()
    layers = runner.model.attention_layers()
    prompt = [5, 17, 29, 41, 60, 61, 62]
    state = CachedRequestState("0", prompt, list(prompt), SamplingParams(), [2], 0)
    _switch(monkeypatch, True)  # a prefill step (7 rows): no GEMV, so unfused whatever the switch
    hidden = runner.model(*runner._device_inputs(build_step_inputs({"0": state}, {"0": len(prompt)}, 16)))
    assert cuda_decode_on_cpu["fused"] == 0
    state.token_ids.append(int(runner.model.compute_logits(hidden)[-1].argmax()))
    state.num_computed_tokens = len(prompt)
    before = [tuple(c.clone() for c in layer.kv_cache) for layer in layers]

    results = {}
    for fused in (False, True):
        for layer, saved in zip(layers, before):
            for cache, old in zip(layer.kv_cache, saved):
                cache.copy_(old)
        _switch(monkeypatch, fused)
        step = build_step_inputs({"0": state}, {"0": 1}, 16)
        logits = runner.model.compute_logits(runner.model(*runner._device_inputs(step)))
        results[fused] = logits, [tuple(c.clone() for c in layer.kv_cache) for layer in layers]
    assert cuda_decode_on_cpu["fused"] == len(layers), "each layer's qkv projection took the fused kernel"
    (plain, plain_caches), (fused_logits, fused_caches) = results[False], results[True]
    assert torch.equal(fused_logits, plain), (fused_logits - plain).abs().max()
    for (k0, v0), (k1, v1), (kb, _) in zip(plain_caches, fused_caches, before):
        assert torch.equal(k1, k0) and torch.equal(v1, v0)
        assert not torch.equal(k0, kb), "the decode token was stored"
