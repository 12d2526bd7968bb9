"""`triton_route` (the gate GEMV and the routing in one launch, split-K with an in-launch combine)
against the torch reference `select_experts(F.linear(x.float(), w.float()))`, through the Triton
interpreter on CPU tensors: ERNIE (fp32 gate, score bias, norm_min, folded shared experts) and
Qwen3-like routers, powers of two and not for experts and hidden sizes, 1 to 16 tokens. Also: the
split counter is back at zero after a launch, a second launch gives the same bits, T = 0 launches
nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.interpreter import require_interpreter

# Triton decides interpreter vs GPU code when a kernel is decorated: before ernieserve.layers.moe
triton = require_interpreter()

from ernieserve.kernels import split_k  # noqa: E402
from ernieserve.layers.moe import RouterConfig, select_experts  # noqa: E402
from ernieserve.layers.moe import fused_moe as fm  # noqa: E402


def ernie_cfg(num_experts: int, top_k: int = 6, norm_min: float = 1e-12) -> RouterConfig:
    return RouterConfig(num_experts, top_k, renormalize=True, norm_min=norm_min, logits_fp32=True, has_score_bias=True)


def qwen_cfg(num_experts: int, top_k: int = 4) -> RouterConfig:
    return RouterConfig(num_experts, top_k, renormalize=True, norm_min=0.0, logits_fp32=False, has_score_bias=False)


def peaked_inputs(num_tokens: int, num_experts: int, hidden: int, x_dtype: torch.dtype, w_dtype: torch.dtype,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and a gate whose logits are apart: each token's logit is about 3.0, 2.7, 2.4, ... for eight
    random experts (x has a component along their gate rows), about 0 +- 0.1 for the others, so the
    top-k is unambiguous under any summation order while the probabilities stay far from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_experts, hidden, generator=g) / hidden**0.5
    x = torch.randn(num_tokens, hidden, generator=g) * 0.1
    for t in range(num_tokens):
        chosen = torch.randperm(num_experts, generator=g)[:8]
        for rank, e in enumerate(chosen.tolist()):
            x[t] += (3.0 - 0.3 * rank) * w[e] / w[e].norm() ** 2
    return x.to(x_dtype), w.to(w_dtype)


def reference(x: torch.Tensor, w: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None,
              num_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = select_experts(F.linear(x.float(), w.float()), cfg, bias)
    if num_shared:
        extra = torch.arange(cfg.num_experts, cfg.num_experts + num_shared).expand(x.shape[0], num_shared)
        ids = torch.cat([ids, extra], dim=1)
        weights = torch.cat([weights, torch.ones(x.shape[0], num_shared)], dim=1)
    return weights, ids


def counters_clean() -> bool:
    return not split_k.tile_counters(torch.device("cpu")).any()


def assert_routes_like_reference(x: torch.Tensor, w: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None,
                                 num_shared: int, x_launched: torch.Tensor | None = None) -> torch.Tensor:
    """triton_route (on x_launched, a view of x's values, if given) picks the reference's ids
    exactly and its weights to fp32 rounding, and leaves the counters clean; returns the ids."""
    ref_w, ref_ids = reference(x, w, cfg, bias, num_shared)
    weights, ids = fm.triton_route(x if x_launched is None else x_launched, w, cfg, bias, num_shared)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (x.shape[0], cfg.top_k + num_shared)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_w, atol=2e-6, rtol=2e-6)
    assert counters_clean()
    return ids


@pytest.mark.parametrize("num_experts,hidden", [(64, 2560), (64, 200), (20, 200), (20, 2560)])
@pytest.mark.parametrize("num_tokens", [1, 3, 16])
@pytest.mark.parametrize("with_bias,num_shared", [(True, 0), (False, 0), (True, 2)])
def test_ernie_routing_matches_reference(num_experts: int, hidden: int, num_tokens: int, with_bias: bool,
                                         num_shared: int) -> None:
    cfg = ernie_cfg(num_experts)
    x, w = peaked_inputs(num_tokens, num_experts, hidden, torch.bfloat16, torch.float32, seed=num_tokens + hidden)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(num_experts, generator=g) * 0.02 if with_bias else None
    assert_routes_like_reference(x, w, cfg, bias, num_shared)


def test_bias_changes_the_choice_not_the_weights() -> None:
    """A large bias on one expert forces it in (as select_experts does); its weight stays its probability."""
    cfg = ernie_cfg(64)
    x, w = peaked_inputs(3, 64, 200, torch.bfloat16, torch.float32, seed=11)
    bias = torch.zeros(64)
    bias[5] = 10.0
    ids = assert_routes_like_reference(x, w, cfg, bias, 0)
    assert (ids[:, 0] == 5).all()


def test_norm_min_clamps_the_renormalisation() -> None:
    cfg = ernie_cfg(20, top_k=2, norm_min=5.0)  # the sum of two probabilities is < 5: weights / 5
    x, w = peaked_inputs(3, 20, 200, torch.bfloat16, torch.float32, seed=12)
    assert_routes_like_reference(x, w, cfg, None, 0)
    assert float(reference(x, w, cfg, None, 0)[0].sum(1).max()) < 0.2 + 1e-6


@pytest.mark.parametrize("num_experts,hidden", [(64, 2560), (20, 200)])
@pytest.mark.parametrize("num_tokens", [1, 3, 16])
def test_qwen3_routing_matches_reference(num_experts: int, hidden: int, num_tokens: int) -> None:
    """The gate in the model dtype (bf16 here): the kernel computes its logits in fp32 from the
    stored values, as the reference on the upcast tensors does."""
    cfg = qwen_cfg(num_experts)
    x, w = peaked_inputs(num_tokens, num_experts, hidden, torch.bfloat16, torch.bfloat16, seed=3 * num_tokens)
    assert_routes_like_reference(x, w, cfg, None, 0)


def test_float32_activations_and_a_strided_input() -> None:
    """x as a column slice of a wider tensor (row stride != H), fp32: the kernel takes its strides."""
    cfg = ernie_cfg(64)
    x, w = peaked_inputs(5, 64, 200, torch.float32, torch.float32, seed=4)
    wide = torch.zeros(5, 300)
    wide[:, 50:250] = x
    assert_routes_like_reference(x, w, cfg, None, 1, x_launched=wide[:, 50:250])


def test_counter_is_reset_and_a_second_launch_gives_the_same_bits() -> None:
    cfg = ernie_cfg(64)
    x, w = peaked_inputs(16, 64, 2560, torch.bfloat16, torch.float32, seed=5)
    g = torch.Generator().manual_seed(8)
    bias = torch.randn(64, generator=g) * 0.02
    first = fm.triton_route(x, w, cfg, bias, 2)
    assert counters_clean()
    second = fm.triton_route(x, w, cfg, bias, 2)
    assert counters_clean()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_no_tokens_launches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_launch(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("launched with no tokens")

    monkeypatch.setattr(fm, "_route_kernel", type("NoLaunch", (), {"__getitem__": lambda self, grid: no_launch})())
    weights, ids = fm.triton_route(torch.zeros(0, 200, dtype=torch.bfloat16), torch.zeros(20, 200), ernie_cfg(20),
                                   torch.zeros(20), 2)
    assert weights.shape == ids.shape == (0, 8)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32


def test_more_tokens_than_the_threshold_are_refused() -> None:
    x = torch.zeros(fm.ROUTE_MAX_TOKENS + 1, 200)
    with pytest.raises(ValueError, match="at most"):
        fm.triton_route(x, torch.zeros(20, 200), ernie_cfg(20), None, 0)


@pytest.mark.parametrize("num_tokens", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("num_experts,hidden", [(64, 2560), (128, 2048), (64, 8192), (20, 200), (8, 32)])
def test_route_tiles_stay_within_their_budgets(num_tokens: int, num_experts: int, hidden: int) -> None:
    """Splits a power of two that covers the hidden size; the combine's partials and the product
    per loop step within the register budgets the tile policy states; about 256 programs at most."""
    t = fm.route_tiles(num_tokens, num_experts, hidden)
    e_pad = triton.next_power_of_2(num_experts)
    assert t.splits & (t.splits - 1) == 0 and t.split_len % 16 == 0
    assert t.splits * t.split_len >= hidden > (t.splits - 1) * t.split_len
    assert t.splits * t.block_t * e_pad <= 16384
    assert t.block_t * t.block_e * t.block_h <= 8192 or t.block_h == 16
    assert triton.cdiv(num_experts, t.block_e) * t.splits <= 256
    assert t.block_t >= num_tokens
