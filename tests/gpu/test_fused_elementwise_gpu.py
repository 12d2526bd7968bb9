"""Fused elementwise Triton kernels vs the layers' torch code at real shapes, and CUDA-graph replay.

Shapes follow ERNIE-4.5-0.3B: hidden 1024, intermediate 3072, 16 query heads, 2 KV heads,
head_dim 128, max_position 131072. Run on the GPU machine with
`pytest -m gpu tests/gpu/test_fused_elementwise_gpu.py` and without TRITON_INTERPRET set.

Rotary is bit-exact (FMA contraction off, same fp32 products and sums as torch's kernels).
RMSNorm and silu-and-mul may differ where the sum of squares is reduced in another order or exp
and rsqrt are approximated differently: an fp32 ulp or two, so fp32 results are compared with a
tight tolerance and bf16 results must agree to the bit in almost every element.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    # skip before importing triton: on CPU machines the interpreted kernel tests set it up
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytest.importorskip("triton")

from ernieserve.kernels.activation import silu_and_mul  # noqa: E402
from ernieserve.kernels.fused_norm import rms_norm  # noqa: E402
from ernieserve.kernels.rotary import apply_rotary_  # noqa: E402
from ernieserve.layers import norm as norm_layer  # noqa: E402
from ernieserve.layers.activation import SiluAndMul  # noqa: E402
from ernieserve.layers.norm import RMSNorm  # noqa: E402
from ernieserve.layers.rotary import RotaryEmbedding  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, MAX_POS = 1024, 3072, 16, 2, 128, 131072
EPS = 1e-5
DEV = torch.device("cuda")
TOKENS = [1, 7, 256, 4099]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
MAX_MISMATCH = 2e-3  # fraction of elements allowed to differ from torch at all (by an ulp)


def assert_near_exact(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, **TOL[ref.dtype])
    if ref.dtype == torch.float32:
        return  # an fp32 ulp in one row's 1/rms moves the whole row; the tolerance is the check
    mismatch = (got != ref).float().mean().item()
    assert mismatch <= MAX_MISMATCH, f"{mismatch:.2%} of elements differ from torch"


def _norm(hidden: int, dtype: torch.dtype) -> RMSNorm:
    layer = RMSNorm(hidden, EPS, dtype).to(DEV)
    layer.weight.data.copy_(torch.randn(hidden, device=DEV) * 0.5 + 1.0)
    return layer


def _qkv(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as DecoderAttention makes them: strided views of one qkv projection output."""
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEV, dtype=dtype)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    return qkv, q.reshape(tokens, HEADS, HEAD_DIM), k.reshape(tokens, KV_HEADS, HEAD_DIM), v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm(dtype: torch.dtype, tokens: int) -> None:
    layer = _norm(HIDDEN, dtype)
    x, residual = torch.randn(2, tokens, HIDDEN, device=DEV, dtype=dtype).unbind(0)
    assert_near_exact(rms_norm(x, layer.weight, EPS), layer.forward_torch(x))
    out, res_out = rms_norm(x, layer.weight, EPS, residual)
    ref_out, ref_res = layer.forward_torch(x, residual)
    torch.testing.assert_close(res_out, ref_res, atol=0, rtol=0)  # one rounded add: exact
    assert_near_exact(out, ref_out)


@pytest.mark.parametrize("hidden", [2560, 8192])  # 21B-A3B and 300B-A47B hidden sizes
def test_rms_norm_other_hidden_sizes(hidden: int) -> None:
    layer = _norm(hidden, torch.bfloat16)
    x, residual = torch.randn(2, 33, hidden, device=DEV, dtype=torch.bfloat16).unbind(0)
    out, res_out = rms_norm(x, layer.weight, EPS, residual)
    ref_out, ref_res = layer.forward_torch(x, residual)
    torch.testing.assert_close(res_out, ref_res, atol=0, rtol=0)
    assert_near_exact(out, ref_out)


def test_rms_norm_per_head_on_qkv_view() -> None:
    """Qwen3's q/k norm on a strided [T, heads, head_dim] view of the qkv output."""
    _, q, _, _ = _qkv(64, torch.bfloat16)
    layer = _norm(HEAD_DIM, torch.bfloat16)
    assert_near_exact(rms_norm(q, layer.weight, EPS), layer.forward_torch(q))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_rotary_bit_exact(dtype: torch.dtype, interleaved: bool, tokens: int) -> None:
    rope = RotaryEmbedding(HEAD_DIM, MAX_POS, 500000.0, interleaved=interleaved).to(DEV)
    qkv, q, k, v = _qkv(tokens, dtype)
    positions = torch.randint(0, MAX_POS, (tokens,), device=DEV)
    ref_q, ref_k = rope.forward_torch(positions, q.clone(), k.clone())
    v_before = v.clone()
    got_q, got_k = apply_rotary_(positions, q, k, rope.cos, rope.sin, interleaved)
    torch.testing.assert_close(got_q, ref_q, atol=0, rtol=0)
    torch.testing.assert_close(got_k, ref_k, atol=0, rtol=0)
    torch.testing.assert_close(v, v_before, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul(dtype: torch.dtype, tokens: int) -> None:
    x = torch.randn(tokens, 2 * INTERMEDIATE, device=DEV, dtype=dtype) * 3
    assert_near_exact(silu_and_mul(x), SiluAndMul.forward_torch(x))


def test_layers_dispatch_to_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA tensors go through the kernels; the environment switch sends them back to torch."""
    calls: list[str] = []
    real = norm_layer.load_elementwise_kernel

    def spy(module: str):
        calls.append(module)
        return real(module)

    for mod in ("norm", "rotary", "activation"):
        monkeypatch.setattr(f"ernieserve.layers.{mod}.load_elementwise_kernel", spy)
    x = torch.randn(4, HIDDEN, device=DEV, dtype=torch.bfloat16)
    _, q, k, _ = _qkv(4, torch.bfloat16)
    pos = torch.arange(4, device=DEV)
    _norm(HIDDEN, torch.bfloat16)(x, x)
    RotaryEmbedding(HEAD_DIM, 64, 10000.0, True).to(DEV)(pos, q, k)
    SiluAndMul()(x)
    assert calls == ["fused_norm", "rotary", "activation"]

    monkeypatch.setenv(norm_layer.DISABLE_ENV, "1")
    calls.clear()
    _norm(HIDDEN, torch.bfloat16)(x, x)
    RotaryEmbedding(HEAD_DIM, 64, 10000.0, True).to(DEV)(pos, q, k)
    SiluAndMul()(x)
    assert calls == []


def test_cuda_graph_capture_and_replay() -> None:
    """One decoder-ish step (norm + residual, in-place rotary on qkv views, silu-and-mul) captured
    once and replayed on new inputs gives the torch results each time."""
    tokens, dtype = 8, torch.bfloat16
    norm = _norm(HIDDEN, dtype)
    rope = RotaryEmbedding(HEAD_DIM, MAX_POS, 500000.0, interleaved=True).to(DEV)
    qkv_width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    static = {
        "x": torch.zeros(tokens, HIDDEN, device=DEV, dtype=dtype),
        "res": torch.zeros(tokens, HIDDEN, device=DEV, dtype=dtype),
        "qkv": torch.zeros(tokens, qkv_width, device=DEV, dtype=dtype),
        "pos": torch.zeros(tokens, dtype=torch.long, device=DEV),
        "gate_up": torch.zeros(tokens, 2 * INTERMEDIATE, device=DEV, dtype=dtype),
    }

    def step() -> tuple[torch.Tensor, ...]:
        q = static["qkv"][:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
        k = static["qkv"][:, HEADS * HEAD_DIM: (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
        out, res = rms_norm(static["x"], norm.weight, EPS, static["res"])
        q, k = apply_rotary_(static["pos"], q, k, rope.cos, rope.sin, True)
        return out, res, q, k, silu_and_mul(static["gate_up"])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile every kernel before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    for seed in range(3):
        g = torch.Generator(device=DEV).manual_seed(seed)
        new = {name: torch.randn(t.shape, generator=g, device=DEV).to(dtype)
               for name, t in static.items() if name != "pos"}
        new["pos"] = torch.randint(0, MAX_POS, (tokens,), generator=g, device=DEV)
        for name, t in static.items():
            t.copy_(new[name])
        graph.replay()
        ref_out, ref_res = norm.forward_torch(new["x"], new["res"])
        qkv = new["qkv"]
        ref_q, ref_k = rope.forward_torch(new["pos"], qkv[:, : HEADS * HEAD_DIM].reshape(tokens, HEADS, HEAD_DIM),
                                          qkv[:, HEADS * HEAD_DIM: (HEADS + KV_HEADS) * HEAD_DIM]
                                          .reshape(tokens, KV_HEADS, HEAD_DIM))
        assert_near_exact(outputs[0], ref_out)
        torch.testing.assert_close(outputs[1], ref_res, atol=0, rtol=0)
        torch.testing.assert_close(outputs[2], ref_q, atol=0, rtol=0)
        torch.testing.assert_close(outputs[3], ref_k, atol=0, rtol=0)
        assert_near_exact(outputs[4], SiluAndMul.forward_torch(new["gate_up"]))
