"""A pre-norm decoder-only transformer shared by ERNIE 4.5 dense, Llama, Qwen2 and Qwen3.

The families differ only in small switches read from their HF config (rotary layout, biases,
q/k norms, tied embeddings), collected in `DecoderSpec`, so one readable implementation serves
all of them. Checkpoint tensors keep HF names; `load_weights` maps the separate q/k/v and
gate/up projections onto our fused layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ernieserve.attention.base import AttentionBackend, AttentionMetadata, KVCache
from ernieserve.distributed.parallel_state import SINGLE, TPGroup
from ernieserve.layers.activation import SiluAndMul
from ernieserve.layers.attention import Attention
from ernieserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ernieserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ernieserve.layers.moe.layer import MoEBlock
from ernieserve.layers.norm import RMSNorm
from ernieserve.layers.quantization import scoped_linear_method
from ernieserve.layers.rotary import RotaryEmbedding


@dataclass(frozen=True, slots=True)
class DecoderSpec:
    rope_interleaved: bool  # ERNIE rotates adjacent pairs, Llama/Qwen rotate halves
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3 normalises q and k per head before rotary


def rope_settings(cfg: Any) -> tuple[float, dict | None]:
    """(theta, scaling dict) from either transformers 5's rope_parameters or the older fields."""
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    scaling = getattr(cfg, "rope_scaling", None) or (params if params.get("rope_type", "default") != "default" else None)
    return float(theta), scaling


def make_rotary(cfg: Any, spec: DecoderSpec) -> RotaryEmbedding:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta, scaling = rope_settings(cfg)
    return RotaryEmbedding(head_dim, cfg.max_position_embeddings, theta, interleaved=spec.rope_interleaved,
                           rope_scaling=scaling)


class DecoderAttention(nn.Module):
    def __init__(self, cfg: Any, spec: DecoderSpec, backend: AttentionBackend, dtype: torch.dtype, tp: TPGroup,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        num_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        # --quantization covers these projections (the loader's quantization_scope picks the method)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, cfg.num_attention_heads, num_kv,
                                          bias=spec.qkv_bias, dtype=dtype, tp=tp, method=scoped_linear_method())
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size,
                                        bias=spec.o_bias, dtype=dtype, tp=tp, method=scoped_linear_method())
        self.q_size = self.qkv_proj.num_heads * self.head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * self.head_dim
        self.rotary = rotary  # one table per model, shared by every layer
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, self.head_dim, backend)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.q_norm is None:  # (Qwen3's q / k norms come between the projection and rotary)
            # ERNIESERVE_FUSED_QKV_ROPE: at one decode row the projection's GEMV can rotate and store itself
            store = self.attn.rope_kv_store(self.rotary, positions, meta)
            q = self.qkv_proj.forward_rope_store(x, store) if store is not None else None
            if q is not None:
                return self.o_proj(self.attn.attend_stored(q, meta))
        qkv = self.qkv_proj(x)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.attn.num_heads, self.head_dim)
        k = k.reshape(-1, self.attn.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # rotary here or, on the Triton backend, fused with the KV store; v stays a strided view
        out = self.attn(q, k, v, meta, rotary=self.rotary, positions=positions)
        return self.o_proj(out)


class DecoderMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias=bias, dtype=dtype, tp=tp,
                                                       method=scoped_linear_method())
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=bias, dtype=dtype, tp=tp,
                                           method=scoped_linear_method())
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, spec: DecoderSpec, backend: AttentionBackend, dtype: torch.dtype, tp: TPGroup,
                 rotary: RotaryEmbedding, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(cfg, spec, backend, dtype, tp, rotary)
        self.mlp = mlp or DecoderMLP(cfg.hidden_size, cfg.intermediate_size, spec.mlp_bias, dtype, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.attend(positions, x, residual, meta)
        return self.mlp(x), residual

    def attend(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
               meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Norm (adding the residual), attention, norm: (the MLP's input, the new residual)."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        return self.post_attention_layernorm(x, residual)


class DecoderModel(nn.Module):
    def __init__(self, cfg: Any, spec: DecoderSpec, backend: AttentionBackend, dtype: torch.dtype, tp: TPGroup,
                 make_mlp: Any = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp)
        # The cos/sin table covers max_position_embeddings (131k positions for ERNIE: 67 MB in
        # fp32): built once and shared, not once per layer (that cost 1.2 GB on the 0.3B model).
        rotary = make_rotary(cfg, spec)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, spec, backend, dtype, tp, rotary, make_mlp(i) if make_mlp else None)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # Every MLP output goes straight into the next norm's residual add (forward below), which
        # can add up a MoE layer's per-slot expert outputs itself.
        for layer in self.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.return_slot_partials = True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


# HF name fragment -> (our parameter fragment, shard id for the fused layer's weight_loader)
STACKED_PARAMS: list[tuple[str, str, object]] = [
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
]


class DecoderForCausalLM(nn.Module):
    """Base of every causal LM we serve: `forward(input_ids, positions, meta) -> hidden`,
    `compute_logits(hidden) -> logits`, `load_weights(named tensors)`."""

    spec: DecoderSpec

    def __init__(self, cfg: Any, backend: AttentionBackend, dtype: torch.dtype, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = cfg
        self.model = self.build_model(cfg, backend, dtype, tp)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, tp)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def build_model(self, cfg: Any, backend: AttentionBackend, dtype: torch.dtype, tp: TPGroup) -> nn.Module:
        return DecoderModel(cfg, self.spec, backend, dtype, tp)

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def bind_kv_caches(self, caches: list[KVCache]) -> None:
        layers = self.attention_layers()
        assert len(layers) == len(caches)
        for layer, cache in zip(layers, caches):
            layer.kv_cache = cache

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def map_weight_name(self, name: str) -> str | None:
        """HF checkpoint name -> our parameter name; None to skip the tensor."""
        if "rotary_emb.inv_freq" in name:
            return None
        if self.tie_word_embeddings and name == "lm_head.weight":
            return None
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters; returns the names of parameters filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = self.map_weight_name(hf_name)
            if name is None:
                continue
            shard_id: object = None
            for hf_part, our_part, sid in STACKED_PARAMS:
                if hf_part in name:
                    name, shard_id = name.replace(hf_part, our_part), sid
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no matching parameter in "
                                 f"{type(self).__name__}")
            loader = getattr(param, "weight_loader", None)
            try:
                if loader is None:
                    if param.shape != tensor.shape:
                        raise ValueError(f"shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
                    param.data.copy_(tensor)
                else:
                    loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {hf_name!r}: {e}") from e
            loaded.add(name)
        return loaded
