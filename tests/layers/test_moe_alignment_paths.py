"""Two ways of skipping work around the MoE layer's grouped GEMMs, through the Triton interpreter:

* `per_assignment_alignment` (ERNIESERVE_MOE_STATIC_ALIGN_MAX_TOKENS): one GEMM block per assignment,
  block_expert a view of the router's ids, the rest static: no align launch. The MoE block's output
  is bit for bit the sorted layout's (bf16, wint8, wint4 experts).
* the down GEMMs' early reads (ERNIESERVE_MOE_DOWN_EARLY, `fused_moe._down_block`): the block's
  alignment, routing weights and per-channel scales read before the PDL wait; only the order of
  loads changes, so the output's bits do not.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.interpreter import require_interpreter

triton = require_interpreter()  # before ernieserve.layers.moe: kernels pick interpreter vs GPU at decoration

from ernieserve.layers.moe import fused_moe as fm  # noqa: E402
from ernieserve.layers.moe import fused_moe_quant as fmq  # noqa: E402
from ernieserve.layers.moe import moe_gemv  # noqa: E402
from tests.layers.test_route_align import folded_block, run_block  # noqa: E402


def test_layout_is_one_block_per_assignment() -> None:
    ids = torch.tensor([[5, 2, 9], [2, 7, 0]], dtype=torch.int32)
    a = fm.per_assignment_alignment(ids, num_experts=12, block_m=4)
    assert a is not None and a.block_m == 4
    n = ids.numel()
    assert a.block_expert.data_ptr() == ids.data_ptr() and torch.equal(a.block_expert, ids.view(-1))
    assert int(a.total) == n * 4
    blocks = a.sorted_ids.view(n, 4)
    assert torch.equal(blocks[:, 0], torch.arange(n, dtype=torch.int32))
    assert (blocks[:, 1:] == n).all()  # padding rows
    # the same sizes the GEMMs check against moe_align's capacity
    assert a.sorted_ids.numel() == fm.padded_capacity(n, 12, 4)
    assert fm.checked_alignment(a, ids, 12, 4)[1].data_ptr() == ids.data_ptr()


def test_layout_is_refused_where_it_does_not_fit() -> None:
    ids = torch.zeros(3, 4, dtype=torch.int32)
    assert fm.per_assignment_alignment(ids, num_experts=8, block_m=16) is None  # 12 assignments > 8 experts
    assert fm.per_assignment_alignment(ids.long(), num_experts=64, block_m=16) is None  # router ids are int32
    assert fm.per_assignment_alignment(torch.zeros(0, 4, dtype=torch.int32), 64, 16) is None


@pytest.mark.parametrize("quantization", [None, "wint8", "wint4"])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_block_output_is_the_same_without_the_align_launch(monkeypatch: pytest.MonkeyPatch,
                                                           quantization: str | None, num_tokens: int) -> None:
    """The folded-shared ERNIE-like block (16 experts, top-4, 2 shared): with the static layout the
    experts launch no align kernel and the output keeps its bits. At 3 tokens the shared experts
    are picked by every token: their weights are read once per token, the sums stay the same."""
    assert fm.STATIC_ALIGN_MAX_TOKENS == 1 and fm.DOWN_EARLY  # on by default (measured on an H100)
    # the fused kernels' layouts (quantized experts at one token take the per-assignment GEMVs by
    # default: test_block_takes_the_per_assignment_gemvs_for_quantized_experts)
    monkeypatch.setattr(moe_gemv, "assign_gemv_enabled", lambda: False)
    block = folded_block(quantization)
    x = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(3 + num_tokens)).to(torch.bfloat16)
    off, off_aligns = run_block(block, x, monkeypatch, 0, static_max_tokens=0)
    on, on_aligns = run_block(block, x, monkeypatch, 0, static_max_tokens=num_tokens)
    assert (off_aligns, on_aligns) == (1, 0)
    assert torch.equal(on, off)
    assert torch.isfinite(off.float()).all() and off.abs().sum() > 0
    # the static layout is taken before the router-side alignment where both would apply
    both, aligns = run_block(block, x, monkeypatch, 8, static_max_tokens=num_tokens)
    assert aligns == 0 and torch.equal(both, off)
    _, aligns = run_block(block, x, monkeypatch, 0, static_max_tokens=num_tokens - 1)
    assert aligns == 1  # past the switch's count


def _routing(num_tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)]).to(torch.int32)
    weights = torch.rand(num_tokens, top_k, generator=g)
    return weights, ids


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_bf16_down_reads_early_with_the_same_bits(monkeypatch: pytest.MonkeyPatch, num_tokens: int) -> None:
    E, H, I, K = 8, 64, 32, 3
    g = torch.Generator().manual_seed(1)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / 8).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) / 6).to(torch.bfloat16)
    x = torch.randn(num_tokens, H, generator=g).to(torch.bfloat16)
    weights, ids = _routing(num_tokens, E, K, 7)
    monkeypatch.setattr(fm, "down_early", lambda: False)
    late = fm.fused_moe_triton(x, w13, w2, weights, ids)
    monkeypatch.setattr(fm, "down_early", lambda: True)
    early = fm.fused_moe_triton(x, w13, w2, weights, ids)
    assert torch.equal(early, late)
    ref = fm.fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(early.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scheme,group", [(fmq.ExpertScheme.WINT8, 0), (fmq.ExpertScheme.WINT4, 0),
                                          (fmq.ExpertScheme.WINT4, 32)])
def test_quantized_down_reads_early_with_the_same_bits(monkeypatch: pytest.MonkeyPatch,
                                                       scheme: fmq.ExpertScheme, group: int) -> None:
    E, H, I, K, T = 8, 64, 64, 3, 2
    g = torch.Generator().manual_seed(2)
    experts = fmq.QuantizedExperts.empty(scheme, group, E, H, I)
    for e in range(E):
        for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            q, s = fmq.quantize_rows(torch.randn(shape, generator=g) / 8, scheme, group)
            experts.store(e, proj, q, s)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    weights, ids = _routing(T, E, K, 9)
    t = fmq.choose_quant_tiles(T * K, E, experts, x.device)
    monkeypatch.setattr(fm, "down_early", lambda: False)
    late = fmq.fused_moe_quant_triton(x, experts, weights, ids, t, path=fmq.QuantMoEPath.FUSED)
    monkeypatch.setattr(fm, "down_early", lambda: True)
    early = fmq.fused_moe_quant_triton(x, experts, weights, ids, t, path=fmq.QuantMoEPath.FUSED)
    assert torch.equal(early, late)
    ref = fmq.fused_moe_quant_ref(x, experts, weights, ids)
    torch.testing.assert_close(early.float(), ref.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("quantization", [None, "wint8", "wint4"])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_shared_experts_computed_before_the_wait_keep_the_bits(monkeypatch: pytest.MonkeyPatch,
                                                               quantization: str | None, num_tokens: int) -> None:
    """ERNIESERVE_MOE_SHARED_EARLY: with one block per assignment the folded shared experts' gate/up
    blocks take their expert, token and row from the slot alone (before the PDL wait on the GPU);
    the output keeps its bits."""
    assert fm.SHARED_EARLY  # on by default (measured on an H100)
    monkeypatch.setattr(moe_gemv, "assign_gemv_enabled", lambda: False)  # the fused kernels' blocks
    block = folded_block(quantization)
    x = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(20 + num_tokens)).to(torch.bfloat16)
    monkeypatch.setattr(fm, "shared_early", lambda: False)
    off, _ = run_block(block, x, monkeypatch, 0, static_max_tokens=num_tokens)
    monkeypatch.setattr(fm, "shared_early", lambda: True)
    launches = []
    module, name = (fm, "_gate_up_kernel") if quantization is None else (fmq, "_gate_up_quant_kernel")
    real = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs.get("SHARED_SLOT0", 0))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, name, Spy())
    on, _ = run_block(block, x, monkeypatch, 0, static_max_tokens=num_tokens)
    assert launches == [block.experts.top_k]  # the 4 routed slots, then the 2 shared ones
    assert torch.equal(on, off)


@pytest.mark.parametrize("quantization", ["wint8", "wint4"])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_block_takes_the_per_assignment_gemvs_for_quantized_experts(monkeypatch: pytest.MonkeyPatch,
                                                                   quantization: str, num_tokens: int) -> None:
    """ERNIESERVE_MOE_ASSIGN_GEMV (on by default): with the static layout, per-channel wint8 / wint4
    experts run moe_gemv's per-assignment GEMVs (CUDA cores, fp32 sums in another order than the
    fused kernels' dots): no align launch, the output within rounding of the sorted layout's."""
    assert moe_gemv.ASSIGN_GEMV  # on by default (measured on an H100)
    block = folded_block(quantization)
    x = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(30 + num_tokens)).to(torch.bfloat16)
    off, _ = run_block(block, x, monkeypatch, 0, static_max_tokens=0)
    calls = []
    real = moe_gemv.assignment_path
    monkeypatch.setattr(moe_gemv, "assignment_path", lambda *a, **k: calls.append(1) or real(*a, **k))
    on, aligns = run_block(block, x, monkeypatch, 0, static_max_tokens=num_tokens)
    assert calls == [1] and aligns == 0
    rel = ((on.float() - off.float()).norm() / off.float().norm()).item()
    assert rel < 1e-2, rel
