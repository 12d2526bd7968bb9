"""The attention layer a model instantiates: owns its KV cache slot and delegates to a backend."""

from __future__ import annotations

import torch
from torch import nn

from ernieserve.attention.base import AttentionBackend, AttentionMetadata, KVCache, RopeInputs, RopeKVStore
from ernieserve.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.backend = backend
        self.kv_cache: KVCache | None = None  # bound once by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                rotary: RotaryEmbedding | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v: [num_tokens, heads * head_dim] or [num_tokens, heads, head_dim], any row stride.
        rotary: rotate q and k by positions first; a backend that can fuses it with the KV store."""
        assert self.kv_cache is not None, "KV cache not bound: the runner must call bind_kv_caches first"
        # [num_tokens, heads * head_dim] -> [num_tokens, heads, head_dim]
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        rope = None
        if rotary is not None:
            assert positions is not None
            tables = rotary.kernel_tables(positions, q, k) if self.backend.fuses_rotary else None
            if tables is not None:
                rope = RopeInputs(*tables, interleaved=rotary.interleaved)
            else:
                q, k = rotary(positions, q, k)
        out = self.backend.forward(q, k, v, self.kv_cache, meta, self.scale, rope=rope)
        return out.reshape(out.shape[0], -1)

    def rope_kv_store(self, rotary: RotaryEmbedding, positions: torch.Tensor,
                      meta: AttentionMetadata) -> RopeKVStore | None:
        """What the qkv projection needs to rotate q and k and store this step's K/V in this layer's
        cache itself (`QKVParallelLinear.forward_rope_store`; then `attend_stored`), or None:
        ERNIESERVE_FUSED_QKV_ROPE off, a backend that stores K/V its own way (not `fuses_rotary`), a
        rotary of halves (neox: a pair spans two GEMV programs), positions that are not 1-D (ERNIE-VL's
        3-D rotary: not taken for now, though its per-token tables would fit), or tables the Triton
        kernels do not take (`kernel_tables`). Decided from flags, shapes and devices only: no host
        sync, graph-capturable."""
        if not (self.backend.fuses_rotary and rotary.interleaved) or positions.dim() != 1:
            return None
        from ernieserve.kernels.gemv import fused_qkv_rope_enabled  # triton: the fusing backend imported it

        if not fused_qkv_rope_enabled():
            return None
        tables = rotary.kernel_tables(positions)
        if tables is None:
            return None
        assert self.kv_cache is not None, "KV cache not bound: the runner must call bind_kv_caches first"
        k_cache, v_cache = self.kv_cache
        return RopeKVStore(*tables, k_cache, v_cache, meta.slot_mapping)

    def attend_stored(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """`forward` for a q [num_tokens, heads * head_dim] already rotated whose K/V the projection
        has already written into the cache (`rope_kv_store`)."""
        q = q.view(-1, self.num_heads, self.head_dim)
        out = self.backend.forward(q, None, None, self.kv_cache, meta, self.scale, kv_stored=True)
        return out.reshape(out.shape[0], -1)
