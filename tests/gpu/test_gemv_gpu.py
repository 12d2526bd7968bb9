"""kernels/gemv.py on the GPU at the real shapes it serves (ERNIE-4.5-21B-A3B's and 0.3B's attention
and MLP projections, Qwen2's qkv bias): against an fp32 F.linear, at 1, 2 and 8 rows, with and
without programmatic dependent launch (the same bits either way), and taken by the linear layers
exactly when the policy says. Run: `pytest -m gpu tests/gpu/test_gemv_gpu.py`."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from ernieserve.kernels import gemv, pdl  # noqa: E402
from ernieserve.layers.linear import RowParallelLinear  # noqa: E402

DEV = torch.device("cuda")
SHAPES = {"21b qkv": (3584, 2560), "21b o": (2560, 2560), "03b qkv": (1536, 1024), "03b o": (1024, 1024),
          "03b gate_up": (6144, 1024), "03b down": (1024, 3072)}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_fp32_linear(name: str, rows: int, bias: bool) -> None:
    n, k = SHAPES[name]
    g = torch.Generator(device=DEV).manual_seed(n + k + rows)
    w = (torch.randn(n, k, device=DEV, generator=g) * k**-0.5).to(torch.bfloat16)
    x = torch.randn(rows, k, device=DEV, generator=g).to(torch.bfloat16)
    b = torch.randn(n, device=DEV, generator=g).to(torch.bfloat16) if bias else None
    assert gemv.gemv_supported(w)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float() if b is not None else None)
    outs = {}
    for on in (False, True):
        with pdl.override(on):
            outs[on] = gemv.gemv(x, w, b)
    torch.cuda.synchronize()
    assert torch.equal(outs[True], outs[False]), "PDL changed the result"
    # bf16 output of an fp32 sum: within one bf16 rounding of the exact value, plus summation order
    torch.testing.assert_close(outs[True].float(), ref, rtol=8e-3, atol=2e-3)
    cublas = torch.nn.functional.linear(x, w, b).float()
    assert (outs[True].float() - ref).abs().max() <= 2 * (cublas - ref).abs().max() + 1e-3


def test_linear_layer_takes_gemv_when_the_policy_says(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = RowParallelLinear(2560, 2560, bias=False, dtype=torch.bfloat16).to(DEV)
    layer.weight.data.normal_(std=2560**-0.5)
    calls = []
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(1, 2560, device=DEV).to(torch.bfloat16)
    with pdl.override(True):
        y = layer(x)
        layer(torch.randn(gemv.gemv_max_tokens() + 1, 2560, device=DEV).to(torch.bfloat16))  # too many rows
    with pdl.override(False):
        layer(x)  # no PDL: cuBLAS
    assert len(calls) == 1
    torch.testing.assert_close(y.float(), torch.nn.functional.linear(x, layer.weight).float(), rtol=2e-2, atol=2e-2)


def test_gemv_in_a_replayed_graph_sees_fresh_inputs() -> None:
    n, k = SHAPES["21b o"]
    w = (torch.randn(n, k, device=DEV) * k**-0.5).to(torch.bfloat16)
    x = torch.zeros(1, k, device=DEV, dtype=torch.bfloat16)
    with pdl.override(True):
        gemv.gemv(x, w)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = gemv.gemv(x, w)
    for seed in range(5):
        x.copy_(torch.randn(1, k, device=DEV, generator=torch.Generator(device=DEV).manual_seed(seed)))
        graph.replay()
        with pdl.override(False):
            want = gemv.gemv(x, w)
        torch.cuda.synchronize()
        assert torch.equal(y, want)


@pytest.mark.parametrize("name", ["21b qkv", "21b o", "03b qkv", "03b down"])
@pytest.mark.parametrize("bits,packed", [(8, False), (4, False), (4, True)], ids=["int8", "int4", "int4-packed"])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_quant_matches_reference(monkeypatch: pytest.MonkeyPatch, name: str, bits: int, packed: bool,
                                      bias: bool) -> None:
    """packed (quant_matmul.int4_dot4): each lane's four products are summed in bf16, rounded after
    each (at most 2^-9 of a partial sum no larger than the sum of |q x|, four times); the fp32 sums
    of those and the output's bf16 rounding come on top. So its bound is per row: 2^-7 of
    scale * sum_k |q_k x_k|, plus the rounding of the output, rather than the fp32 kernels'."""
    from ernieserve.kernels import quant_matmul as qm

    monkeypatch.setattr(gemv, "gemv_packed_enabled", lambda: packed)

    n, k = SHAPES[name]
    g = torch.Generator(device=DEV).manual_seed(n + k + bits)
    w = torch.randn(n, k, device=DEV, generator=g) * k**-0.5
    x = torch.randn(1, k, device=DEV, generator=g).to(torch.bfloat16)
    b = torch.randn(n, device=DEV, generator=g).to(torch.bfloat16) if bias else None
    qweight, scales = (qm.quantize_int8 if bits == 8 else qm.quantize_int4)(w, 0)
    assert gemv.gemv_quant_supported(qweight, scales, bits, k)
    outs = {}
    for on in (False, True):
        with pdl.override(on):
            outs[on] = gemv.gemv_quant(x, qweight, scales, bits, b)
    torch.cuda.synchronize()
    assert torch.equal(outs[True], outs[False]), "PDL changed the result"
    ref = qm.weight_only_matmul_ref(x, qweight, scales, bits, 0, b).float()
    assert gemv._packed(x, qweight, bits, k) == packed
    if packed:
        q = qm.unpack_int4(qweight, k).float()
        bound = 2.0**-7 * scales.float()[:, 0] * (q.abs() * x.float().abs()).sum(-1) + 2.0**-8 * ref.abs()
        err = (outs[True].float() - ref).abs()
        assert (err <= bound + 1e-6).all(), float((err / bound).max())
        return
    gemm = qm.weight_only_matmul(x, qweight, scales, bits, 0, b).float()  # the Triton GEMM it replaces
    torch.testing.assert_close(outs[True].float(), ref, rtol=8e-3, atol=4e-3)
    assert (outs[True].float() - ref).abs().max() <= 2 * (gemm - ref).abs().max() + 4e-3
