"""kernels/gemv.py's qkv GEMV with the rotary + KV store epilogue (`gemv_rope_store`,
`gemv_quant_rope_store`) in Triton's interpreter, against the unfused path it replaces: the plain
`gemv` / `gemv_quant`, then `apply_rotary_and_store_kv_` on its q, k, v views. Same bits for q and
for the whole caches (slot -1 rows leave them untouched); bf16, int8, int4; bias; head_dim 16 and
128; one row and several; a bf16 and an fp32 cache. The policy (`rope_layout`, the switch) too."""

from __future__ import annotations

import pytest
import torch

from interpreter import require_interpreter  # noqa: E402 (tests/kernels)

triton = require_interpreter()

from ernieserve.kernels import gemv  # noqa: E402
from ernieserve.kernels import quant_matmul as qm  # noqa: E402
from ernieserve.kernels.rotary import apply_rotary_and_store_kv_  # noqa: E402
from ernieserve.layers.rotary import RotaryEmbedding  # noqa: E402

BLOCK_SIZE, NUM_BLOCKS = 4, 6


def _problem(seed: int, heads: int, kv_heads: int, head_dim: int, k: int, tokens: int, bias: bool,
             cache_dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    n = (heads + 2 * kv_heads) * head_dim
    w = torch.randn(n, k, generator=g) * k**-0.5
    x = torch.randn(tokens, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, interleaved=True)
    positions = torch.randint(0, 512, (tokens,), generator=g)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:tokens]
    if tokens > 1:
        slots[1] = -1  # a padding row: q still computed, nothing stored
    # a cache full of older tokens: every slot not written must keep its bits
    cache = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim, generator=g).to(cache_dtype)
    return w, x, b, rotary, positions, slots, cache


def _unfused(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, rotary: RotaryEmbedding,
             positions: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor):
    """What the decoder does without the fusion: split the projection, rotate q, store k and v."""
    q, k, v = qkv.view(qkv.shape[0], -1, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    k_cache, v_cache = cache.clone().unbind(0)
    apply_rotary_and_store_kv_(positions, q, k, v, rotary.cos, rotary.sin, True, k_cache, v_cache, slots)
    return q.reshape(qkv.shape[0], -1), k_cache, v_cache


CASES = {  # heads, kv_heads, head_dim, K
    "hd16": (4, 2, 16, 64),
    "hd16-k112": (2, 1, 16, 112),  # K in three chunks
    "hd128": (2, 1, 128, 64),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4", "int4-packed"])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_equals_gemv_then_rotary_store(monkeypatch: pytest.MonkeyPatch, case: str, weights: str, tokens: int,
                                             bias: bool) -> None:
    """int4-packed: both GEMVs with quant_matmul.int4_dot4's products (ERNIESERVE_GEMV_PACKED)."""
    heads, kv_heads, head_dim, k = CASES[case]
    packed = weights == "int4-packed"
    monkeypatch.setattr(gemv, "gemv_packed_enabled", lambda: packed)
    weights = weights.removesuffix("-packed")
    block_n = 4 if weights == "bf16" else 8
    stored = {"bf16": 2 * k, "int8": k, "int4": k // 2}[weights]  # bytes of a weight row
    monkeypatch.setattr(gemv, "SLICE_BYTES", block_n * stored)  # several programs per head
    seed = hash((case, weights, tokens, bias)) % 2**31
    w, x, b, rotary, positions, slots, cache = _problem(seed, heads, kv_heads, head_dim, k, tokens, bias,
                                                        torch.bfloat16)
    k_cache, v_cache = cache.clone().unbind(0)
    if weights == "bf16":
        w = w.to(torch.bfloat16)
        qkv = gemv.gemv(x, w, b)
        q = gemv.gemv_rope_store(x, w, b, positions, rotary.cos, rotary.sin, k_cache, v_cache, slots)
    else:
        bits = 8 if weights == "int8" else 4
        qweight, scales = (qm.quantize_int8 if bits == 8 else qm.quantize_int4)(w, 0)
        assert gemv._packed(x.reshape(-1, k), qweight, bits, k) == packed
        qkv = gemv.gemv_quant(x, qweight, scales, bits, b)
        q = gemv.gemv_quant_rope_store(x, qweight, scales, bits, b, positions, rotary.cos, rotary.sin, k_cache,
                                       v_cache, slots)
    ref_q, ref_k_cache, ref_v_cache = _unfused(qkv, heads, kv_heads, head_dim, rotary, positions, slots, cache)
    assert q is not None and q.shape == (tokens, heads * head_dim) and q.dtype == torch.bfloat16
    assert torch.equal(q, ref_q)
    assert torch.equal(k_cache, ref_k_cache)
    assert torch.equal(v_cache, ref_v_cache)


@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_fp32_cache_gets_k_rounded_to_the_activation_dtype_first(monkeypatch: pytest.MonkeyPatch,
                                                                 weights: str) -> None:
    heads, kv_heads, head_dim, k = CASES["hd16"]
    monkeypatch.setattr(gemv, "SLICE_BYTES", 4 * 2 * k if weights == "bf16" else 8 * k // 2)
    w, x, b, rotary, positions, slots, cache = _problem(7, heads, kv_heads, head_dim, k, 2, True, torch.float32)
    k_cache, v_cache = cache.clone().unbind(0)
    if weights == "bf16":
        w = w.to(torch.bfloat16)
        qkv = gemv.gemv(x, w, b)
        q = gemv.gemv_rope_store(x, w, b, positions, rotary.cos, rotary.sin, k_cache, v_cache, slots)
    else:
        qweight, scales = qm.quantize_int4(w, 0)
        qkv = gemv.gemv_quant(x, qweight, scales, 4, b)
        q = gemv.gemv_quant_rope_store(x, qweight, scales, 4, b, positions, rotary.cos, rotary.sin, k_cache,
                                       v_cache, slots)
    ref_q, ref_k_cache, ref_v_cache = _unfused(qkv, heads, kv_heads, head_dim, rotary, positions, slots, cache)
    assert torch.equal(q, ref_q) and torch.equal(k_cache, ref_k_cache) and torch.equal(v_cache, ref_v_cache)
    written = ref_k_cache.view(-1, kv_heads, head_dim)[slots[0]]
    assert torch.equal(written, written.to(torch.bfloat16).float()), "k rounded to bf16 before the fp32 cache"


def test_padding_slot_stores_nothing_and_rotation_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    heads, kv_heads, head_dim, k = CASES["hd16"]
    monkeypatch.setattr(gemv, "SLICE_BYTES", 4 * 2 * k)
    w, x, b, rotary, positions, _, cache = _problem(3, heads, kv_heads, head_dim, k, 1, False, torch.bfloat16)
    w = w.to(torch.bfloat16)
    k_cache, v_cache = cache.clone().unbind(0)
    slots = torch.tensor([-1])
    q = gemv.gemv_rope_store(x, w, None, positions, rotary.cos, rotary.sin, k_cache, v_cache, slots)
    assert torch.equal(k_cache, cache[0]) and torch.equal(v_cache, cache[1])
    # the layers' torch rotary (the reference of the rotary kernels) on the plain projection's q
    qkv = gemv.gemv(x, w)
    q_ref, _ = rotary.forward_torch(positions, qkv[:, : heads * head_dim].view(1, heads, head_dim),
                                    qkv[:, heads * head_dim:].view(1, -1, head_dim))
    torch.testing.assert_close(q.view(1, heads, head_dim), q_ref, atol=1e-2, rtol=1e-2)


def test_layout_that_straddles_heads_falls_back() -> None:
    assert gemv.rope_layout(3584, 4, 4, 128) == (2560, 512)  # 21B-A3B: 20 q heads, 4 kv heads
    assert gemv.rope_layout(2560, 8, 2, 128) == (2048, 256)  # 0.3B
    assert gemv.rope_layout(128, 32, 2, 16) is None  # a program's rows would span two heads
    assert gemv.rope_layout(128, 1, 2, 16) is None  # no whole pairs
    assert gemv.rope_layout(130, 2, 2, 16) is None  # q is not whole heads
    assert gemv.rope_layout(64, 2, 2, 16) is None  # no q rows
    # the default slice at a tiny K gives programs wider than a head: nothing launched, None
    heads, kv_heads, head_dim, k = CASES["hd16"]
    w, x, _, rotary, positions, slots, cache = _problem(1, heads, kv_heads, head_dim, k, 1, False, torch.bfloat16)
    k_cache, v_cache = cache.clone().unbind(0)
    assert gemv.gemv_rope_store(x, w.to(torch.bfloat16), None, positions, rotary.cos, rotary.sin, k_cache, v_cache,
                                slots) is None
    assert torch.equal(k_cache, cache[0])


def test_switch_reads_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, want in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("ERNIESERVE_FUSED_QKV_ROPE", value)
        gemv.fused_qkv_rope_enabled.cache_clear()
        assert gemv.fused_qkv_rope_enabled() is want
    monkeypatch.delenv("ERNIESERVE_FUSED_QKV_ROPE")
    gemv.fused_qkv_rope_enabled.cache_clear()
    assert gemv.fused_qkv_rope_enabled(), "on by default (measured on an H100)"
    gemv.fused_qkv_rope_enabled.cache_clear()
