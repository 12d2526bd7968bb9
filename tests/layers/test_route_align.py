"""`triton_route_align`: the router's last program also writes `moe_align`'s outputs (through the
Triton interpreter on CPU tensors). For 1 to 8 tokens, with and without folded shared experts and
the score bias, and with every token on the same experts: the weights and ids are `triton_route`'s,
and total, block_expert[:total // block_m] and sorted_ids[:total] are moe_align's, bit for bit.
Also: the MoE block gives the same output with the fused path on as off (bf16 experts, the Triton
path), and the switch's bounds.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.interpreter import require_interpreter

# Triton decides interpreter vs GPU code when a kernel is decorated: before ernieserve.layers.moe
triton = require_interpreter()

from ernieserve.distributed.parallel_state import TPGroup  # noqa: E402
from ernieserve.layers.moe import FusedMoE, MoEBlock, RouterConfig, TopKRouter  # noqa: E402
from ernieserve.layers.moe import fused_moe as fm  # noqa: E402
from tests.layers.test_router_kernel import counters_clean, peaked_inputs  # noqa: E402


def ernie_cfg(num_experts: int, top_k: int) -> RouterConfig:
    return RouterConfig(num_experts, top_k, renormalize=True, norm_min=1e-12, logits_fp32=True, has_score_bias=True)


def assert_aligned_like_moe_align(alignment: fm.Alignment, ids: torch.Tensor, num_experts: int) -> None:
    bm = alignment.block_m
    sorted_ids, block_expert, total = fm.moe_align(ids, num_experts, bm)
    assert alignment.sorted_ids.shape == sorted_ids.shape and alignment.block_expert.shape == block_expert.shape
    assert alignment.total.shape == total.shape == (1,)
    n = int(total)
    assert int(alignment.total) == n
    assert torch.equal(alignment.block_expert[:n // bm], block_expert[:n // bm])
    assert torch.equal(alignment.sorted_ids[:n], sorted_ids[:n])


def route_and_check(x: torch.Tensor, w: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None,
                    num_shared: int, block_m: int) -> torch.Tensor:
    ref_w, ref_ids = fm.triton_route(x, w, cfg, bias, num_shared)
    weights, ids, alignment = fm.triton_route_align(x, w, cfg, bias, num_shared, block_m)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_w)
    assert alignment.block_m == block_m
    assert_aligned_like_moe_align(alignment, ids, cfg.num_experts + num_shared)
    assert counters_clean()
    return ids


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_bias,num_shared", [(True, 0), (False, 0), (True, 2), (False, 1)])
def test_aligns_like_moe_align(num_tokens: int, seed: int, with_bias: bool, num_shared: int) -> None:
    """ERNIE-21B's router (64 experts, top-6) at a short hidden size; block_m as the GEMMs choose it."""
    cfg = ernie_cfg(64, 6)
    x, w = peaked_inputs(num_tokens, 64, 200, torch.bfloat16, torch.float32, seed=100 * seed + num_tokens)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 0.02 if with_bias else None
    n = num_tokens * (cfg.top_k + num_shared)
    route_and_check(x, w, cfg, bias, num_shared, fm.choose_tile_config(n, 64 + num_shared).block_m)


@pytest.mark.parametrize("num_tokens", [1, 3, 8])
@pytest.mark.parametrize("block_m", [1, 2, 4, 16])
def test_small_blocks_and_many_experts_per_block(num_tokens: int, block_m: int) -> None:
    """Few experts, so each gets several assignments: with block_m below the count an expert has
    several blocks (the GEMV path's block_m 1..8), with 16 several experts' padding."""
    cfg = ernie_cfg(6, 3)
    x, w = peaked_inputs(num_tokens, 6, 96, torch.float32, torch.float32, seed=num_tokens + block_m)
    route_and_check(x, w, cfg, torch.randn(6, generator=torch.Generator().manual_seed(3)) * 0.02, 2, block_m)


@pytest.mark.parametrize("num_tokens", [2, 8])
@pytest.mark.parametrize("block_m", [4, 16])
def test_every_token_on_the_same_experts(num_tokens: int, block_m: int) -> None:
    """A large bias on experts 5, 9 and 40 sends every token to them: three full segments (several
    blocks each at block_m 4), all other experts empty."""
    cfg = ernie_cfg(64, 3)
    x, w = peaked_inputs(num_tokens, 64, 200, torch.bfloat16, torch.float32, seed=21)
    bias = torch.zeros(64)
    bias[[5, 9, 40]] = torch.tensor([10.0, 11.0, 12.0])
    ids = route_and_check(x, w, cfg, bias, 2, block_m)
    assert torch.equal(ids[:, :3].sort(dim=1).values, torch.tensor([5, 9, 40]).expand(num_tokens, 3).int())


def test_sizes_past_the_slot_cap_are_refused() -> None:
    assert fm.route_align_supported(8, 8) and not fm.route_align_supported(1, 65)
    assert fm.route_align_supported(16, 4) and not fm.route_align_supported(16, 8)
    assert not fm.route_align_supported(0, 8)
    cfg = ernie_cfg(64, 6)
    x, w = peaked_inputs(16, 64, 200, torch.bfloat16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="padded slots"):
        fm.triton_route_align(x, w, cfg, None, 2, 16)


def test_a_mismatched_alignment_is_refused() -> None:
    ids = torch.tensor([[0, 3]], dtype=torch.int32)
    other = fm.align_buffers(2, 8, 32, torch.device("cpu"))
    with pytest.raises(ValueError, match="block_m"):
        fm.checked_alignment(other, ids, 8, 16)


# ---- the MoE block, routed and aligned in one launch or in two --------------------------------------

def folded_block(quantization: str | None = None, num_experts: int = 16, top_k: int = 4, hidden: int = 64,
                 inter: int = 32) -> MoEBlock:
    """ERNIE-like: fp32 gate with a score bias, bf16 experts, two shared experts folded in."""
    from ernieserve.layers.quantization import parse_quantization
    from ernieserve.layers.quantization.base import quantization_scope

    g = torch.Generator().manual_seed(5)
    cfg = ernie_cfg(num_experts, top_k)
    with quantization_scope(parse_quantization(quantization) if quantization else None):
        block = MoEBlock(TopKRouter(hidden, cfg, torch.bfloat16),
                         FusedMoE(num_experts, top_k, hidden, inter, torch.bfloat16, TPGroup(0, 1), shared_slots=2))
    block.gate.weight.data.copy_(torch.randn(num_experts, hidden, generator=g) / hidden**0.5)
    block.gate.e_score_correction_bias.copy_(torch.randn(num_experts, generator=g) * 0.02)
    experts = block.experts
    for e in range(num_experts + 2):
        for proj, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            w = (torch.randn(shape, generator=g) / shape[1] ** 0.5).to(torch.bfloat16)
            experts.weight_loader(experts.w2 if proj == "down" else experts.w13, w, (e, proj))
    experts.method.process_weights_after_loading(experts)
    if quantization:
        experts.expert_quant.triton = True  # as on CUDA: the Triton kernels, here through the interpreter
    return block


def run_block(block: MoEBlock, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch, max_tokens: int,
              static_max_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """The block's output with route_align_max_tokens() = max_tokens (and static_align_max_tokens()
    = static_max_tokens), on the CUDA code path
    (CPU tensors reporting is_cuda: the Triton kernels run in the interpreter), and how many times
    the experts launched the align kernel themselves."""
    calls = []
    real_align = fm.moe_align

    def counting_align(*args, **kwargs):
        calls.append(1)
        return real_align(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        m.setattr(fm, "moe_align", counting_align)
        m.setattr(fm, "route_align_max_tokens", lambda: max_tokens)
        m.setattr(fm, "static_align_max_tokens", lambda: static_max_tokens)
        out = block(x)
    return out, len(calls)


@pytest.mark.parametrize("num_tokens", [1, 3, 8])
def test_block_output_is_the_same_with_the_fused_alignment(monkeypatch: pytest.MonkeyPatch, num_tokens: int) -> None:
    """bf16 experts on the Triton path: routing and aligning in the router's launch changes which
    kernel writes the alignment, not a bit of the output; the experts' own align launch goes."""
    block = folded_block()
    x = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(num_tokens)).to(torch.bfloat16)
    assert fm.ROUTE_ALIGN_MAX_TOKENS == 0  # off by default: unmeasured on a GPU
    off, off_aligns = run_block(block, x, monkeypatch, 0)
    on, on_aligns = run_block(block, x, monkeypatch, 8)
    assert (off_aligns, on_aligns) == (1, 0)
    assert on.dtype == torch.bfloat16 and on.shape == (num_tokens, 64)
    assert torch.equal(on, off)
    assert torch.isfinite(off.float()).all() and off.abs().sum() > 0
    # past the switch's token count the block aligns as before
    _, aligns = run_block(block, x, monkeypatch, num_tokens - 1)
    assert aligns == 1


def test_quantized_block_output_is_the_same_with_the_fused_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    """wint8 experts (fused_moe_quant_triton's FUSED path) take the router's alignment too."""
    block = folded_block("wint8")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    off, off_aligns = run_block(block, x, monkeypatch, 0)
    on, on_aligns = run_block(block, x, monkeypatch, 8)
    assert (off_aligns, on_aligns) == (1, 0)
    assert torch.equal(on, off)


def test_expert_parallel_and_cpu_keep_the_separate_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "route_align_max_tokens", lambda: 8)
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    one_rank = FusedMoE(8, 2, 16, 12, torch.bfloat16, TPGroup(0, 1))
    assert one_rank.align_block_m(x) is None  # CPU: the torch reference, no alignment at all
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert one_rank.align_block_m(x) == fm.choose_tile_config(4, 8).block_m
    ep = FusedMoE(8, 2, 16, 12, torch.bfloat16, TPGroup(0, 2), expert_parallel=True)
    assert ep.align_block_m(x) is None
    assert one_rank.align_block_m(torch.zeros(9, 16, dtype=torch.bfloat16)) is None  # past the switch
