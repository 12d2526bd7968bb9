"""ERNIE 4.5 MoE (21B-A3B, 300B-A47B), as HF transformers' `Ernie4_5_MoeForCausalLM` defines it.

The shared decoder with ERNIE's switches (interleaved RoPE, `use_bias` on attention, MLPs and the
LM head), where layer i's MLP is sparse when
``(i + 1) % moe_layer_interval == 0 and moe_layer_start_index <= i <= moe_layer_end_index``
and dense (`intermediate_size`) otherwise. A sparse MLP is a float32 router over
`moe_num_experts` experts picking `moe_k` (with the optional `e_score_correction_bias`), the
routed experts (`moe_intermediate_size`, no biases: HF's `Ernie4_5_MoeExperts` has none) and
`moe_num_shared_experts` shared experts fused into one MLP of
`moe_intermediate_size * moe_num_shared_experts`, added to the routed output. Here the shared
experts are S more expert slots every token takes with weight 1 (layers/moe/layer.py, MoEBlock),
unless expert parallelism or `use_bias` keeps them a separate MLP.

Checkpoint names (HF): ``model.layers.{i}.mlp.gate.weight`` [E, H] float32,
``model.layers.{i}.mlp.moe_statics.e_score_correction_bias`` [1, E],
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``,
``model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight``; multi-token-prediction
tensors (``mtp*``) are skipped, as HF skips them.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ernieserve.attention.base import AttentionBackend
from ernieserve.distributed.parallel_state import SINGLE, TPGroup
from ernieserve.layers.moe import FusedMoE, MoEBlock, RouterConfig, TopKRouter, load_moe_weights
from ernieserve.models.decoder import DecoderForCausalLM, DecoderMLP, DecoderModel, DecoderSpec


def _first(value: Any) -> int:
    """ERNIE VL configs give some MoE indices per modality as lists; the text tower uses the first."""
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def ernie_moe_layer_ids(cfg: Any) -> set[int]:
    """Indices of the sparse layers (HF's `Ernie4_5_MoeDecoderLayer.__init__` rule)."""
    n = cfg.num_hidden_layers
    start = _first(getattr(cfg, "moe_layer_start_index", 1))
    end = _first(getattr(cfg, "moe_layer_end_index", -1))
    end = n - 1 if end == -1 else end
    interval = _first(getattr(cfg, "moe_layer_interval", 1))
    if _first(getattr(cfg, "moe_num_experts", 0)) <= 0:
        return set()
    return {i for i in range(n) if (i + 1) % interval == 0 and start <= i <= end}


class Ernie4_5_MoeForCausalLM(DecoderForCausalLM):
    def __init__(self, cfg: Any, backend: AttentionBackend, dtype: torch.dtype, tp: TPGroup | None = None) -> None:
        self.use_bias = bool(getattr(cfg, "use_bias", False))
        self.spec = DecoderSpec(rope_interleaved=True, qkv_bias=self.use_bias, o_bias=self.use_bias,
                                mlp_bias=self.use_bias, qk_norm=False)
        super().__init__(cfg, backend, dtype, tp or SINGLE)
        if self.use_bias:  # HF's lm_head is nn.Linear(bias=use_bias); the bias is never tied
            self.lm_head.bias = nn.Parameter(torch.zeros(cfg.vocab_size, dtype=dtype), requires_grad=False)

    def build_model(self, cfg: Any, backend: AttentionBackend, dtype: torch.dtype, tp: TPGroup) -> nn.Module:
        sparse = ernie_moe_layer_ids(cfg)
        return DecoderModel(cfg, self.spec, backend, dtype, tp,
                            make_mlp=lambda i: self._sparse_mlp(cfg, dtype, tp) if i in sparse else None)

    def _sparse_mlp(self, cfg: Any, dtype: torch.dtype, tp: TPGroup) -> MoEBlock:
        num_experts, top_k = _first(cfg.moe_num_experts), _first(cfg.moe_k)
        inter = _first(cfg.moe_intermediate_size)
        router = RouterConfig(num_experts=num_experts, top_k=top_k, renormalize=True,
                              norm_min=float(getattr(cfg, "moe_norm_min", 1e-12)), logits_fp32=True,
                              has_score_bias=True)
        num_shared = int(getattr(cfg, "moe_num_shared_experts", 0) or 0)
        # bias-free shared experts run as always-chosen experts (MoEBlock); expert parallelism keeps them apart
        experts = FusedMoE(num_experts, top_k, cfg.hidden_size, inter, dtype, tp,
                           shared_slots=0 if self.use_bias else num_shared)
        shared = None
        if num_shared and not experts.shared_slots:
            shared = DecoderMLP(cfg.hidden_size, inter * num_shared, self.use_bias, dtype, tp)
        return MoEBlock(TopKRouter(cfg.hidden_size, router, dtype), experts, shared)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)  # [num_tokens, vocab]
        bias = getattr(self.lm_head, "bias", None)
        return logits if bias is None else logits + bias

    def map_weight_name(self, name: str) -> str | None:
        if "mtp" in name:  # multi-token-prediction heads; HF ignores them too
            return None
        name = name.replace(".mlp.moe_statics.", ".mlp.gate.")
        return super().map_weight_name(name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        loaded |= super().load_weights(load_moe_weights(self, weights, loaded))
        return loaded
