"""Attention backend interface.

The model runner builds one `AttentionMetadata` per step; every attention layer of the model hands
it to the backend together with its own KV cache. Token layout is "varlen": all requests' new
tokens of this step are concatenated, request i owning rows
``query_start_loc[i]:query_start_loc[i+1]``. A decode row is simply a request with one new token,
so models never branch on prefill vs decode; backends may.

KV cache layout, per layer: a pair ``(k_cache, v_cache)``, each
``[num_blocks, block_size, num_kv_heads, head_dim]``. Token t of request i lives in block
``block_tables[i, t // block_size]`` at offset ``t % block_size``; its flat slot is
``block_id * block_size + offset``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(slots=True)
class AttentionMetadata:
    num_reqs: int
    num_tokens: int  # real tokens; tensors may be padded beyond it (CUDA graphs)
    max_query_len: int
    # an upper bound of seq_lens: the batch's longest, or (decode steps, eager and captured alike) the
    # model's max length, which the split-K decode policy reads
    max_seq_len: int
    # [num_reqs + 1] int32, on device: cumulative new-token counts
    query_start_loc: torch.Tensor
    # [num_reqs] int32, on device: context length after this step (cached + new tokens)
    seq_lens: torch.Tensor
    # [num_reqs, max_blocks_per_req] int32, on device
    block_tables: torch.Tensor
    # [num_tokens] int64, on device: flat KV slot of each new token; -1 = padding, do not store
    slot_mapping: torch.Tensor
    # host copies of query_start_loc and seq_lens, for backends that loop on the host
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    # True when every request has exactly one new token (a pure decode step)
    is_decode_only: bool = False
    # True when tensors hold padding tokens that no request owns (a mixed-step CUDA graph):
    # their attention output must be zero, whatever num_tokens says
    zero_unowned_rows: bool = False


KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(slots=True)
class RopeInputs:
    """Rotary tables for a backend that rotates q and k itself (`fuses_rotary`): token t uses row
    positions[t] of cos and sin ([rows, head_dim // 2] float32)."""

    positions: torch.Tensor  # [num_tokens]
    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool


class RopeKVStore(NamedTuple):
    """What a qkv projection needs to rotate q and k and write this step's K/V into a layer's paged
    cache itself (the fused decode GEMV, `kernels.gemv.gemv_rope_store`, whose arguments after the
    bias these are, in order): token t uses row positions[t] of the fp32 cos / sin tables
    ([rows, head_dim // 2], interleaved pairs) and goes to slot slot_mapping[t] (-1: not stored).
    The backend is then called with ``kv_stored=True`` (`Attention.attend_stored`)."""

    positions: torch.Tensor  # [num_tokens]
    cos: torch.Tensor
    sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor


class AttentionBackend(ABC):
    """Stores this step's K/V into the paged cache, then attends over the whole context."""

    name: str = "abstract"
    # True: forward takes `rope` and rotates q and k itself (fused with the KV store); otherwise
    # the attention layer rotates them first
    fuses_rotary: bool = False

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
        rope: RopeInputs | None = None,
        kv_stored: bool = False,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """kv_stored: query is already rotated and this step's K/V already in the cache (the qkv
        projection stored them, see `RopeKVStore`; only `fuses_rotary` backends are asked); key and
        value are then None."""
        ...

    # CUDA-graph hooks. A backend that can be captured keeps its per-step inputs in persistent
    # buffers sized for `max_num_reqs`; the runner calls these around capture and replay.
    def supports_cuda_graph(self) -> bool:
        return False

    def init_cuda_graph_state(self, max_num_reqs: int, max_blocks_per_req: int, device: torch.device) -> None:
        raise NotImplementedError(f"{self.name} does not support CUDA graphs")
