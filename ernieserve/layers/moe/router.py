"""Routers: which `top_k` of `num_experts` experts each token goes to, and with what weight.

Two semantics, both written to match Hugging Face transformers exactly:

- ERNIE 4.5 (`Ernie4_5_MoeTopKRouter`): logits in float32 from a float32 gate weight, softmax,
  top-k chosen on softmax + `e_score_correction_bias` (the bias only picks experts; the weights
  are the unbiased probabilities), renormalised by their sum clamped below at `moe_norm_min`.
- Qwen3-MoE (`Qwen3MoeTopKRouter`): logits in the model dtype, softmax in float32, top-k,
  renormalised by the plain sum when `norm_topk_prob`.

`select_experts` is the plain-torch reference; on CUDA the layer calls the fused Triton kernels in
`fused_moe.py` instead: up to `ROUTE_MAX_TOKENS` tokens (decode), `triton_route` computes the logits
(float32, from x and the gate in their stored dtypes) and routes them in one launch; more tokens
take the gate GEMM, then `triton_select_experts` (softmax, bias, top-k and renormalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ernieserve.layers.moe.fused_moe import Alignment


@dataclass(frozen=True, slots=True)
class RouterConfig:
    num_experts: int
    top_k: int
    renormalize: bool  # divide the chosen weights by their sum
    norm_min: float  # lower clamp of that sum (ERNIE's moe_norm_min; 0 for Qwen3)
    logits_fp32: bool  # ERNIE computes the gate in float32 whatever the model dtype
    has_score_bias: bool  # ERNIE's e_score_correction_bias buffer exists (zeros unless loaded)


def select_experts(
    logits: torch.Tensor,  # [num_tokens, num_experts], float32 or model dtype
    cfg: RouterConfig,
    score_bias: torch.Tensor | None,  # [num_experts] float32, or None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference routing: (weights [num_tokens, top_k] float32, ids [num_tokens, top_k] int64)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    scores = probs if score_bias is None else probs + score_bias
    _, ids = torch.topk(scores, cfg.top_k, dim=-1)
    weights = torch.gather(probs, dim=-1, index=ids)
    if cfg.renormalize:
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=cfg.norm_min)
    return weights, ids


class TopKRouter(nn.Module):
    """The gate: `weight` [num_experts, hidden] (HF name `mlp.gate.weight`), plus ERNIE's bias.

    ERNIE keeps the gate in float32 (HF's `_keep_in_fp32_modules_strict`), so its logits are
    float32 even in a bf16 model; Qwen3 keeps it in the model dtype.
    """

    def __init__(self, hidden_size: int, cfg: RouterConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        weight_dtype = torch.float32 if cfg.logits_fp32 else dtype
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size, dtype=weight_dtype), requires_grad=False)
        if cfg.has_score_bias:
            # A buffer, not a parameter: checkpoints without it are valid (it then stays zero).
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, num_experts]."""
        if self.cfg.logits_fp32:
            return nn.functional.linear(x.float(), self.weight.float())
        return nn.functional.linear(x, self.weight)

    def forward(self, x: torch.Tensor, num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [num_tokens, top_k] float32, ids [num_tokens, top_k] int32 or int64).
        num_shared: append that many always-chosen experts (ids num_experts.., weight 1): the
        shared experts when MoEBlock folded them into the routed ones."""
        if x.is_cuda:
            from ernieserve.layers.moe.fused_moe import ROUTE_MAX_TOKENS, triton_route, triton_select_experts

            if x.shape[0] <= ROUTE_MAX_TOKENS:  # decode sizes: GEMV and routing in one launch
                return triton_route(x, self.weight, self.cfg, self.e_score_correction_bias, num_shared)
            return triton_select_experts(self.logits(x), self.cfg, self.e_score_correction_bias, num_shared)
        logits = self.logits(x)
        weights, ids = select_experts(logits, self.cfg, self.e_score_correction_bias)
        if num_shared:
            extra = torch.arange(self.cfg.num_experts, self.cfg.num_experts + num_shared, device=ids.device)
            ids = torch.cat([ids, extra.expand(ids.shape[0], num_shared)], dim=1)
            weights = torch.cat([weights, weights.new_ones(weights.shape[0], num_shared)], dim=1)
        return weights, ids

    def route_and_align(self, x: torch.Tensor, num_shared: int,
                        block_m: int) -> tuple[torch.Tensor, torch.Tensor, Alignment]:
        """forward's (weights, ids) on CUDA at decode sizes, and moe_align's outputs for those ids
        (experts and folded shared experts, at block_m) from the same launch: fused_moe.triton_route_align,
        for the sizes fused_moe.route_align_supported takes (FusedMoE.align_block_m decides)."""
        from ernieserve.layers.moe.fused_moe import triton_route_align

        return triton_route_align(x, self.weight, self.cfg, self.e_score_correction_bias, num_shared, block_m)

    def load_score_bias(self, loaded: torch.Tensor) -> None:
        """HF stores the bias as [1, num_experts] (one expert group); accept any shape of that size."""
        assert self.e_score_correction_bias is not None
        if loaded.numel() != self.cfg.num_experts:
            raise ValueError(f"e_score_correction_bias has {loaded.numel()} values, expected {self.cfg.num_experts}")
        self.e_score_correction_bias.copy_(loaded.reshape(-1))
