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

from ernieserve.layers.moe import RouterConfig  # noqa: E402
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
