"""Pure-torch paged attention: the oracle every faster backend is checked against.

Runs on CPU and GPU. It loops over requests on the host, which is fine for a reference and for
CPU serving, where the matmuls dominate; it is not what the GPU fast path uses.
"""

from __future__ import annotations

import torch

from ernieserve.attention.base import AttentionBackend, AttentionMetadata, KVCache, RopeInputs


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Write this step's K/V ([num_tokens, num_kv_heads, head_dim]) into their cache slots."""
    k_cache, v_cache = kv_cache
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    n = slot_mapping.shape[0]
    valid = slot_mapping[:n] >= 0
    slots = slot_mapping[:n][valid]
    # [num_blocks * block_size, num_kv_heads, head_dim] views of the caches
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[:n][valid].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[:n][valid].to(v_cache.dtype)


def gather_context(kv_cache: KVCache, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one request's first seq_len tokens: each [seq_len, num_kv_heads, head_dim]."""
    k_cache, v_cache = kv_cache
    block_size = k_cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = k_cache[blocks].flatten(0, 1)[:seq_len]
    v = v_cache[blocks].flatten(0, 1)[:seq_len]
    return k, v


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its cached context (already stored)."""
    num_heads = query.shape[1]
    num_kv_heads = kv_cache[0].shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query)
    qsl = meta.query_start_loc_cpu.tolist()
    seq_lens = meta.seq_lens_cpu.tolist()
    for i in range(meta.num_reqs):
        start, end, seq_len = qsl[i], qsl[i + 1], seq_lens[i]
        q_len = end - start
        if q_len == 0:
            continue
        k, v = gather_context(kv_cache, meta.block_tables[i], seq_len)
        # [num_heads, q_len, head_dim] x [num_heads, head_dim, seq_len] in float32 for a stable oracle
        q = query[start:end].transpose(0, 1).float()
        k = k.transpose(0, 1).float().repeat_interleave(group, dim=0)
        v = v.transpose(0, 1).float().repeat_interleave(group, dim=0)
        scores = torch.matmul(q, k.transpose(1, 2)) * scale
        # new token j sits at position seq_len - q_len + j and sees keys up to that position
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
    return out


class TorchRefBackend(AttentionBackend):
    name = "torch"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
        rope: RopeInputs | None = None,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        assert rope is None and not kv_stored, "the reference backend does not fuse rotary (fuses_rotary is False)"
        store_kv(key, value, kv_cache, meta.slot_mapping)
        return paged_attention_ref(query, kv_cache, meta, scale)
