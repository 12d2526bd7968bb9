"""The per-assignment GEMVs of quantized experts (moe_gemv.assignment_path) on the GPU, at
ERNIE-4.5-21B-A3B's shapes with its two folded shared experts (66 experts, 6 routed + 2 shared
slots, H 2560, I 1536), bf16 activations. Run with ``pytest -m gpu tests/gpu/test_moe_assign_gpu.py``.

* against the plain-torch reference and the fused kernels on the same quantized weights, one token
  and two, default and explicit tile pairs (2 to 16 gate rows, 4 to 32 down rows);
* replayed in a CUDA graph with PDL (when the GPU has it) over new inputs and routing, each replay
  against the reference, and the slots' bits equal to the eager call's;
* both with int4's packed bf16x2 products (quant_matmul.int4_dot4) and with the fp32 conversion;
  int4_dot4's PTX exact where every bf16 step is (small integers), and within its rounding bound
  elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from ernieserve.kernels.pdl import pdl_enabled
from ernieserve.layers.moe import fused_moe as fm
from ernieserve.layers.moe import fused_moe_quant as fmq
from ernieserve.layers.moe import moe_gemv
from ernieserve.layers.moe.fused_moe_quant import ExpertScheme, QuantizedExperts, QuantMoEPath
from tests.gpu.graph_capture import capture

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

E, SHARED, TOP_K, H, I = 64, 2, 6, 2560, 1536
TOL = 1e-2  # both accumulate in fp32 and round the activation and each slot's output to bf16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


_EXPERTS: dict[ExpertScheme, QuantizedExperts] = {}


def experts_of(scheme: ExpertScheme) -> QuantizedExperts:
    if scheme not in _EXPERTS:
        _EXPERTS.clear()
        g = torch.Generator(device="cuda").manual_seed(0)
        ex = QuantizedExperts.empty(scheme, 0, E + SHARED, H, I, torch.device("cuda"))
        for e in range(E + SHARED):
            for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                w = (torch.randn(*shape, device="cuda", generator=g) / shape[1] ** 0.5).bfloat16()
                ex.store(e, proj, *fmq.quantize_rows(w, scheme, 0))
        _EXPERTS[scheme] = ex
    return _EXPERTS[scheme]


def routing(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:TOP_K] for _ in range(num_tokens)])
    ids = torch.cat([ids, torch.arange(E, E + SHARED, device="cuda").repeat(num_tokens, 1)], dim=1)
    w = torch.rand(num_tokens, TOP_K, device="cuda", generator=g) + 0.1
    w = torch.cat([w / w.sum(-1, keepdim=True), torch.ones(num_tokens, SHARED, device="cuda")], dim=1)
    return w.float().contiguous(), ids.to(torch.int32).contiguous()


# (scheme, int4's packed bf16x2 products)
SCHEMES = [(ExpertScheme.WINT4, True), (ExpertScheme.WINT4, False), (ExpertScheme.WINT8, False)]
SCHEME_IDS = ["wint4-packed", "wint4-fp32", "wint8"]


@pytest.fixture
def packed(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> bool:
    monkeypatch.setattr(moe_gemv, "assign_packed", lambda: request.param)
    return request.param


@pytest.mark.parametrize("scheme,packed", SCHEMES, ids=SCHEME_IDS, indirect=["packed"])
@pytest.mark.parametrize("num_tokens", [1, 2])
def test_matches_reference_and_fused(scheme: ExpertScheme, packed: bool, num_tokens: int) -> None:
    experts = experts_of(scheme)
    x = torch.randn(num_tokens, H, device="cuda").bfloat16()
    weights, ids = routing(num_tokens, seed=num_tokens)
    ref = fmq.fused_moe_quant_ref(x, experts, weights, ids)
    align = fm.per_assignment_alignment(ids, E + SHARED, 16)
    fused = fmq.fused_moe_quant_triton(x, experts, weights, ids, path=QuantMoEPath.FUSED, alignment=align,
                                       shared_slots=SHARED)
    for tiles in (None, (2, 4), (4, 8), (16, 32)):
        out = moe_gemv.assignment_path(x, experts, weights, ids, shared_slots=SHARED, tiles=tiles)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL, tiles
        assert rel_err(out, fused) < TOL, tiles


@pytest.mark.parametrize("scheme,packed", SCHEMES, ids=SCHEME_IDS, indirect=["packed"])
def test_replayed_graph(scheme: ExpertScheme, packed: bool) -> None:
    """Three layers in a row in one graph (the second and third gate/up launched behind a down GEMV,
    with PDL where the GPU has it), each replay on new inputs and routing."""
    experts = experts_of(scheme)
    x = torch.randn(1, H, device="cuda").bfloat16()
    weights, ids = routing(1, seed=3)
    static = [x.clone(), weights.clone(), ids.clone()]

    def run() -> list[torch.Tensor]:
        return [moe_gemv.assignment_path(static[0], experts, static[1], static[2], sum_slots=False,
                                         shared_slots=SHARED) for _ in range(3)]

    eager = run()
    graph, captured = capture(run)
    graph.replay()
    torch.cuda.synchronize()
    for out in captured:
        assert torch.equal(out, eager[0])
    for seed in (4, 5, 6):
        x2 = torch.randn(1, H, device="cuda").bfloat16()
        w2, ids2 = routing(1, seed=seed)
        static[0].copy_(x2)
        static[1].copy_(w2)
        static[2].copy_(ids2)
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        ref = fmq.fused_moe_quant_ref(x2, experts, w2, ids2)
        for out in captured:
            assert rel_err(out.sum(dim=1), ref) < TOL
    print(f"PDL: {pdl_enabled(x.device)}")


if CUDA:
    import triton
    import triton.language as tl

    from ernieserve.kernels.quant_matmul import by2, int4_dot4

    @triton.jit
    def _dot4_probe(w_ptr, x_ptr, out_ptr, ROWS: tl.constexpr, C: tl.constexpr):
        """[ROWS, C] elements loaded as the GEMVs load them (two-element vectors), one warp."""
        r = tl.arange(0, ROWS)[:, None]
        j = by2(C)[None, :]
        out = int4_dot4(tl.load(w_ptr + r * C + j), tl.load(x_ptr + r * C + j), True)
        tl.store(out_ptr + r * C + j, out)


def _dot4_case(x_values: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int4_dot4's PTX, the exact sums and the sums of |q x| in float64) for random 16-bit words
    (int16 here: the asm sees the bits) and x [4, 128, 4] (bf16)."""
    from ernieserve.kernels.quant_matmul import unpack_int4

    g = torch.Generator(device="cuda").manual_seed(seed)
    words = torch.randint(0, 1 << 16, (4, 128), device="cuda", generator=g, dtype=torch.int32)
    w = words.to(torch.int16)
    x = x_values.bfloat16().contiguous()
    out = torch.empty(4, 128, dtype=torch.float32, device="cuda")
    _dot4_probe[(1,)](w, x.view(torch.int64).view(4, 128), out, 4, 128, num_warps=1)
    byte = words.to(torch.uint8)  # low byte: k, k + 1; high byte: k + 2, k + 3
    q = torch.cat([unpack_int4(byte.view(-1, 1), 2), unpack_int4((words >> 8).to(torch.uint8).view(-1, 1), 2)], 1)
    exact = (q.double().view(4, 128, 4) * x.double()).sum(-1)
    bound = (q.double().view(4, 128, 4) * x.double()).abs().sum(-1)
    return out, exact, bound


def test_int4_dot4_exact_on_small_integers() -> None:
    """x in -4..4: every product (at most 32) and every sum of four is an integer bf16 holds, so the
    packed PTX must give the exact sums, for every nibble in each of its four places."""
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randint(-4, 5, (4, 128, 4), device="cuda", generator=g).float()
    out, exact, _ = _dot4_case(x, seed=2)
    assert torch.equal(out.double(), exact)


def test_int4_dot4_within_its_rounding_bound() -> None:
    """Random x: four bf16 roundings (after each product), each at most 2^-9 of a partial sum no larger
    than the sum of |q x|."""
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4, 128, 4, device="cuda", generator=g) * 3
    out, exact, bound = _dot4_case(x, seed=4)
    err = (out.double() - exact).abs()
    assert (err <= 4 * 2.0 ** -9 * bound + 1e-30).all(), float((err / bound.clamp_min(1e-30)).max())
    assert err.max() > 0  # bf16 products do round here: the bound, not exactness, is what holds
