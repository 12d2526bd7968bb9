"""The per-assignment GEMVs of quantized experts (moe_gemv.assignment_path) on the GPU, at
ERNIE-4.5-21B-A3B's shapes with its two folded shared experts (66 experts, 6 routed + 2 shared
slots, H 2560, I 1536), bf16 activations. Run with ``pytest -m gpu tests/gpu/test_moe_assign_gpu.py``.

* against the plain-torch reference and the fused kernels on the same quantized weights, one token
  and two, default and explicit tile pairs (2 to 16 gate rows, 4 to 32 down rows);
* replayed in a CUDA graph with PDL (when the GPU has it) over new inputs and routing, each replay
  against the reference, and the slots' bits equal to the eager call's.
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


@pytest.mark.parametrize("scheme", [ExpertScheme.WINT4, ExpertScheme.WINT8], ids=lambda s: s.value)
@pytest.mark.parametrize("num_tokens", [1, 2])
def test_matches_reference_and_fused(scheme: ExpertScheme, num_tokens: int) -> None:
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


@pytest.mark.parametrize("scheme", [ExpertScheme.WINT4, ExpertScheme.WINT8], ids=lambda s: s.value)
def test_replayed_graph(scheme: ExpertScheme) -> None:
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
