"""Qwen3-MoE (e.g. Qwen3-30B-A3B, 235B-A22B), as HF transformers' `Qwen3MoeForCausalLM` defines it.

Qwen3's attention (per-head q/k RMSNorm, half-split RoPE); layer i's MLP is sparse when
``i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0``, else a
dense MLP of `intermediate_size`. The router is the model-dtype gate, softmax in float32, top-k,
renormalised when `norm_topk_prob`; no shared experts.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ernieserve.attention.base import AttentionBackend
from ernieserve.distributed.parallel_state import SINGLE, TPGroup
from ernieserve.layers.moe import FusedMoE, MoEBlock, RouterConfig, TopKRouter, load_moe_weights
from ernieserve.models.decoder import DecoderForCausalLM, DecoderModel, DecoderSpec


def qwen3_moe_layer_ids(cfg: Any) -> set[int]:
    """Indices of the sparse layers (HF's `Qwen3MoeDecoderLayer.__init__` rule)."""
    dense_only = set(getattr(cfg, "mlp_only_layers", None) or [])
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    if int(getattr(cfg, "num_experts", 0) or 0) <= 0:
        return set()
    return {i for i in range(cfg.num_hidden_layers) if i not in dense_only and (i + 1) % step == 0}


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    def __init__(self, cfg: Any, backend: AttentionBackend, dtype: torch.dtype, tp: TPGroup | None = None) -> None:
        bias = bool(getattr(cfg, "attention_bias", False))
        self.spec = DecoderSpec(rope_interleaved=False, qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)
        super().__init__(cfg, backend, dtype, tp or SINGLE)

    def build_model(self, cfg: Any, backend: AttentionBackend, dtype: torch.dtype, tp: TPGroup) -> nn.Module:
        sparse = qwen3_moe_layer_ids(cfg)
        return DecoderModel(cfg, self.spec, backend, dtype, tp,
                            make_mlp=lambda i: self._sparse_mlp(cfg, dtype, tp) if i in sparse else None)

    def _sparse_mlp(self, cfg: Any, dtype: torch.dtype, tp: TPGroup) -> MoEBlock:
        router = RouterConfig(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                              renormalize=bool(cfg.norm_topk_prob), norm_min=0.0, logits_fp32=False,
                              has_score_bias=False)
        experts = FusedMoE(cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size,
                           dtype, tp)
        return MoEBlock(TopKRouter(cfg.hidden_size, router, dtype), experts)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        loaded |= super().load_weights(load_moe_weights(self, weights, loaded))
        return loaded
