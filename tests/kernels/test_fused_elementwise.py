"""Fused elementwise Triton kernels (RMSNorm, rotary, silu-and-mul) vs the layers' torch code.

Runs on CPU through the Triton interpreter at tiny shapes chosen for the edges: hidden sizes that
are not powers of two, strided [tokens, heads, head_dim] views of a fused qkv tensor, head counts
and half-dims that need masking, several column tiles per row. fp32 is compared tightly, bf16
loosely: the interpreter casts fp32 to bf16 by truncation, not round-to-nearest-even as the GPU
does, so bit-exactness in bf16 is checked only in tests/gpu/test_fused_elementwise_gpu.py.
"""

from __future__ import annotations


import pytest
import torch

from interpreter import require_interpreter  # noqa: E402 (tests/kernels)

triton = require_interpreter()

from ernieserve.kernels.activation import BLOCK as SILU_BLOCK  # noqa: E402
from ernieserve.kernels.activation import silu_and_mul  # noqa: E402
from ernieserve.kernels.fused_norm import rms_norm  # noqa: E402
from ernieserve.kernels.rotary import apply_rotary_  # noqa: E402
from ernieserve.layers import norm as norm_layer  # noqa: E402
from ernieserve.layers.activation import SiluAndMul  # noqa: E402
from ernieserve.layers.norm import RMSNorm  # noqa: E402
from ernieserve.layers.rotary import RotaryEmbedding  # noqa: E402

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.bfloat16]


def _norm_layer(hidden: int, dtype: torch.dtype, seed: int = 0) -> RMSNorm:
    layer = RMSNorm(hidden, eps=1e-5, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    layer.weight.data.copy_(torch.randn(hidden, generator=g) * 0.5 + 1.0)
    return layer


# ------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_matches_torch(dtype: torch.dtype, hidden: int) -> None:
    layer = _norm_layer(hidden, dtype)
    x = torch.randn(5, hidden, dtype=dtype) * 3
    torch.testing.assert_close(rms_norm(x, layer.weight, layer.eps), layer.forward_torch(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_with_residual_matches_torch(dtype: torch.dtype, hidden: int) -> None:
    layer = _norm_layer(hidden, dtype)
    x, residual = torch.randn(2, 5, hidden, dtype=dtype), torch.randn(2, 5, hidden, dtype=dtype)
    out, res_out = rms_norm(x, layer.weight, layer.eps, residual)
    ref_out, ref_res = layer.forward_torch(x, residual)
    assert out.shape == x.shape and res_out.shape == x.shape
    exact = dict(atol=0, rtol=0) if dtype == torch.float32 else TOL[dtype]  # see the module docstring
    torch.testing.assert_close(res_out, ref_res, **exact)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots", [1, 3, 8])
def test_rms_norm_adds_slot_partials_first(dtype: torch.dtype, slots: int) -> None:
    """x [tokens, slots, hidden] with a residual [tokens, hidden] (a MoE layer's per-slot expert
    outputs): the kernel's sum of the slots is torch's x.sum(dim=1), then the usual residual norm."""
    hidden = 100
    layer = _norm_layer(hidden, dtype)
    g = torch.Generator().manual_seed(slots)
    parts = torch.randn(5, slots, hidden, generator=g).to(dtype)
    residual = torch.randn(5, hidden, generator=g).to(dtype)
    out, res_out = rms_norm(parts, layer.weight, layer.eps, residual)
    ref_out, ref_res = layer.forward_torch(parts.sum(dim=1), residual)
    assert out.shape == residual.shape and res_out.shape == residual.shape
    torch.testing.assert_close(res_out, ref_res, **TOL[dtype])
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    # the torch reference takes the same input form
    torch.testing.assert_close(layer.forward_torch(parts, residual)[1], ref_res, atol=0, rtol=0)
    # a slot view with a row stride larger than slots * hidden (every other row of a bigger buffer)
    wide = torch.zeros(10, slots, hidden, dtype=dtype)
    wide[::2] = parts
    out2, res2 = rms_norm(wide[::2], layer.weight, layer.eps, residual)
    torch.testing.assert_close(res2, res_out, atol=0, rtol=0)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_on_strided_qkv_view(dtype: torch.dtype) -> None:
    """Qwen3's q/k norm: [T, heads, head_dim] views of the fused qkv output, read without a copy."""
    tokens, heads, kv_heads, head_dim = 4, 3, 1, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)
    assert not q.is_contiguous()
    layer = _norm_layer(head_dim, dtype)
    torch.testing.assert_close(rms_norm(q, layer.weight, layer.eps), layer.forward_torch(q), **TOL[dtype])


def test_rms_norm_promotes_like_torch() -> None:
    """An fp32 weight on bf16 activations gives fp32 out, as `weight * y` does in torch."""
    layer = _norm_layer(48, torch.float32)
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    out = rms_norm(x, layer.weight, layer.eps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer.forward_torch(x), **TOL[torch.bfloat16])  # y is rounded to bf16


def test_rms_norm_into_preallocated_outputs() -> None:
    layer = _norm_layer(64, torch.float32)
    x, residual = torch.randn(3, 64), torch.randn(3, 64)
    out, res_out = torch.empty(3, 64), torch.empty(3, 64)
    got = rms_norm(x, layer.weight, layer.eps, residual, out=out, residual_out=res_out)
    assert got[0] is out and got[1] is res_out
    torch.testing.assert_close(out, layer.forward_torch(x, residual)[0], **TOL[torch.float32])


# ------------------------------------------------------------------------------------------
# Rotary
# ------------------------------------------------------------------------------------------


def _qkv_views(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """q, k, v as the decoder makes them: strided views into one [T, (Hq + 2 Hkv) D] tensor."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return qkv, q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim), v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (6, 3, 24)])
def test_rotary_in_place_matches_torch(dtype: torch.dtype, interleaved: bool, heads: int, kv_heads: int,
                                       head_dim: int) -> None:
    rope = RotaryEmbedding(head_dim, max_position=64, theta=10000.0, interleaved=interleaved)
    tokens = 5
    qkv, q, k, v = _qkv_views(tokens, heads, kv_heads, head_dim, dtype)
    positions = torch.tensor([0, 3, 63, 17, 17])
    ref_q, ref_k = rope.forward_torch(positions, q.clone(), k.clone())
    v_before = v.clone()
    got_q, got_k = apply_rotary_(positions, q, k, rope.cos, rope.sin, interleaved)
    assert got_q.data_ptr() == qkv.data_ptr()  # rotated in place, inside the qkv buffer
    torch.testing.assert_close(got_q, ref_q, **TOL[dtype])
    torch.testing.assert_close(got_k, ref_k, **TOL[dtype])
    torch.testing.assert_close(v, v_before, atol=0, rtol=0)  # v's columns untouched


def test_rotary_on_contiguous_int32_positions() -> None:
    rope = RotaryEmbedding(16, max_position=32, theta=500000.0, interleaved=True)
    q, k = torch.randn(3, 2, 16), torch.randn(3, 1, 16)
    positions = torch.tensor([5, 0, 31], dtype=torch.int32)
    ref_q, ref_k = rope.forward_torch(positions.long(), q, k)
    got_q, got_k = apply_rotary_(positions, q.clone(), k.clone(), rope.cos, rope.sin, True)
    torch.testing.assert_close(got_q, ref_q, **TOL[torch.float32])
    torch.testing.assert_close(got_k, ref_k, **TOL[torch.float32])


# ------------------------------------------------------------------------------------------
# silu-and-mul
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 100), (2, 3, 2 * 64), (2, 2 * (SILU_BLOCK + 37))])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=dtype) * 4
    got = silu_and_mul(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(got, SiluAndMul.forward_torch(x), **TOL[dtype])


# ------------------------------------------------------------------------------------------
# Layer dispatch
# ------------------------------------------------------------------------------------------


def test_env_switch_forces_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(norm_layer.DISABLE_ENV, "1")
    layers = [RMSNorm(8), RotaryEmbedding(8, 4, 10000.0, True), SiluAndMul()]
    assert not any(layer.use_triton for layer in layers)
    monkeypatch.delenv(norm_layer.DISABLE_ENV)
    assert all(layer.use_triton for layer in [RMSNorm(8), RotaryEmbedding(8, 4, 10000.0, True), SiluAndMul()])


def test_cpu_tensors_keep_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with kernels enabled, CPU tensors never reach triton: the torch code is the reference."""
    def no_kernels(module: str) -> None:
        raise AssertionError(f"kernel {module} loaded for a CPU tensor")

    monkeypatch.setattr("ernieserve.layers.norm.load_elementwise_kernel", no_kernels)
    monkeypatch.setattr("ernieserve.layers.rotary.load_elementwise_kernel", no_kernels)
    monkeypatch.setattr("ernieserve.layers.activation.load_elementwise_kernel", no_kernels)
    norm, rope, act = RMSNorm(8), RotaryEmbedding(8, 4, 10000.0, True), SiluAndMul()
    assert norm.use_triton and rope.use_triton and act.use_triton
    x = torch.randn(2, 8)
    torch.testing.assert_close(norm(x, x), norm.forward_torch(x, x))
    q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
    torch.testing.assert_close(rope(torch.tensor([1, 2]), q, k), rope.forward_torch(torch.tensor([1, 2]), q, k))
    torch.testing.assert_close(act(x), SiluAndMul.forward_torch(x))
