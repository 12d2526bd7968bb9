"""kernels/gemv.py in Triton's interpreter against torch.nn.functional.linear: K in one, two and
three power-of-two chunks, N not a multiple of the block, bias, several rows, strided x; and the
policy (which weights qualify, when layers take it)."""

from __future__ import annotations

import pytest
import torch

from ernieserve.kernels import gemv, pdl

pytestmark = pytest.mark.skipif(not gemv.HAS_TRITON, reason="needs triton")


@pytest.mark.parametrize("k", [64, 96, 112, 160])  # 64; 64+32; 64+32+16; 128+32
@pytest.mark.parametrize("n", [8, 13])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(monkeypatch: pytest.MonkeyPatch, k: int, n: int, m: int, bias: bool) -> None:
    monkeypatch.setattr(gemv, "SLICE_BYTES", 4 * k * 2)  # 4 rows a program: several programs, a ragged last one
    g = torch.Generator().manual_seed(k * 100 + n * 10 + m)
    w = torch.randn(n, k, generator=g, dtype=torch.float32).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g, dtype=torch.float32).to(torch.bfloat16)
    b = torch.randn(n, generator=g, dtype=torch.float32).to(torch.bfloat16) if bias else None
    out = gemv.gemv(x, w, b)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float() if b is not None else None)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_gemv_strided_rows_and_leading_dims() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g).to(torch.bfloat16)
    wide = torch.randn(2, 3, 80, generator=g).to(torch.bfloat16)
    x = wide[..., :64]  # rows 80 apart
    out = gemv.gemv(x, w)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out.float(), torch.nn.functional.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)


def test_k_chunks() -> None:
    assert gemv.k_chunks(2560) == (2048, 512, 0)
    assert gemv.k_chunks(3072) == (2048, 1024, 0)
    assert gemv.k_chunks(1024) == (1024, 0, 0)
    assert gemv.k_chunks(112) == (64, 32, 16)
    assert gemv.k_chunks(1000) is None  # 512 + 256 + 128 + 64 + 32 + 8
    assert gemv.k_chunks(0) is None


def test_block_n_and_support() -> None:
    assert gemv.block_n_for(2560, 2560, 2) == 4  # 20 KiB of bf16 a program
    assert gemv.block_n_for(1536, 1024, 2) == 8
    assert gemv.block_n_for(3, 64, 2) == 4  # not past N's power of two
    assert gemv.gemv_supported(torch.empty(3584, 2560, dtype=torch.bfloat16))  # 21B qkv_proj
    assert not gemv.gemv_supported(torch.empty(3584, 2560, dtype=torch.float32))
    assert not gemv.gemv_supported(torch.empty(24576, 2560, dtype=torch.bfloat16))  # 126 MB: cuBLAS
    assert not gemv.gemv_supported(torch.empty(64, 1000, dtype=torch.bfloat16))  # K in four chunks
    assert not gemv.gemv_supported(torch.empty(64, 128, dtype=torch.bfloat16).t())  # not [N, K] contiguous


def test_use_gemv_needs_cuda_and_pdl(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.empty(64, 64, dtype=torch.bfloat16)
    x = torch.empty(1, 64, dtype=torch.bfloat16)
    with pdl.override(True):
        assert not gemv.use_gemv(x, w), "CPU tensors never take it"
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pdl.override(True):
        assert gemv.use_gemv(x, w)
        assert not gemv.use_gemv(torch.empty(gemv.MAX_TOKENS + 1, 64, dtype=torch.bfloat16), w), "too many rows"
        assert not gemv.use_gemv(x.float(), w)
        monkeypatch.setenv("ERNIESERVE_DENSE_GEMV_MAX_TOKENS", "0")
        gemv.gemv_max_tokens.cache_clear()
        assert not gemv.use_gemv(x, w)
    monkeypatch.delenv("ERNIESERVE_DENSE_GEMV_MAX_TOKENS")
    gemv.gemv_max_tokens.cache_clear()
    with pdl.override(False):
        assert not gemv.use_gemv(x, w), "without PDL the weight is read after launch: cuBLAS"


@pytest.mark.parametrize("bits,packed", [(8, False), (4, False), (4, True)], ids=["int8", "int4", "int4-packed"])
@pytest.mark.parametrize("k", [64, 96, 112, 160])
@pytest.mark.parametrize("n", [8, 13])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_quant_matches_reference(monkeypatch: pytest.MonkeyPatch, bits: int, packed: bool, k: int, n: int,
                                      bias: bool) -> None:
    """packed: int4 as uint16 pairs of bytes times 64-bit words of x (quant_matmul.int4_dot4, whose
    interpreter form sums the products in fp32): K 96 = 64 + 32, 112 = 64 + 32 + 16, 160 = 128 + 32."""
    from ernieserve.kernels import quant_matmul as qm

    monkeypatch.setattr(gemv, "gemv_packed_enabled", lambda: packed)
    monkeypatch.setattr(gemv, "SLICE_BYTES", 4 * k)  # a few rows a program, a ragged last one
    g = torch.Generator().manual_seed(bits * 1000 + k * 10 + n)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    qweight, scales = (qm.quantize_int8 if bits == 8 else qm.quantize_int4)(w, 0)
    assert gemv.gemv_quant_supported(qweight, scales, bits, k)
    assert gemv._packed(x, qweight, bits, k) == packed
    out = gemv.gemv_quant(x, qweight, scales, bits, b)
    ref = qm.weight_only_matmul_ref(x, qweight, scales, bits, 0, b)
    assert out.dtype == torch.bfloat16 and out.shape == (1, n)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_gemv_quant_support_and_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from ernieserve.kernels import quant_matmul as qm

    w = torch.randn(64, 2560)
    q8, s8 = qm.quantize_int8(w, 0)
    q4, s4 = qm.quantize_int4(w, 0)
    assert gemv.gemv_quant_supported(q8, s8, 8, 2560) and gemv.gemv_quant_supported(q4, s4, 4, 2560)
    g4, gs = qm.quantize_int4(w, 128)
    assert not gemv.gemv_quant_supported(g4, gs, 4, 2560), "group-wise scales stay on the GEMM"
    x = torch.empty(1, 2560, dtype=torch.bfloat16)
    with pdl.override(True):
        assert not gemv.use_gemv_quant(x, q8, s8, 8), "CPU tensors never take it"
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pdl.override(True):
        assert gemv.use_gemv_quant(x, q4, s4, 4)
        assert not gemv.use_gemv_quant(torch.empty(2, 2560, dtype=torch.bfloat16), q4, s4, 4), "one row only"
    with pdl.override(False):
        assert not gemv.use_gemv_quant(x, q4, s4, 4)
