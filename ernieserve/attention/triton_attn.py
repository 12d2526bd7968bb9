"""Triton attention backend: paged KV store + unified (prefill/mixed) and split-K decode kernels.

One backend instance serves every attention layer of a model (layers run one after another, so
they share the split-K scratch buffer). Decode-only steps go to the split-K decode kernel, every
other step to the unified kernel, which handles any mix of prefill chunks and decodes.

CUDA graphs (decode-only batches): the runner calls `init_cuda_graph_state` once, warms up
eagerly, then captures one graph per padded batch size. Inside a captured step:
  - `meta.num_reqs` is the padded batch size and the tensors are sized for it; a padded request
    has seq_len 0 (its output row is zeros) and its token's slot is -1 (nothing is stored);
  - the split count comes from the host ints `meta.num_reqs` and `meta.max_seq_len` at capture
    time and is frozen into the graph. Any split count is correct for any context length (each
    request cuts its own context into that many pieces), so this only affects speed and rounding:
    capture with `max_seq_len` = the model's max length to favour long contexts (eager decode steps
    pass it too, and the policy rounds the batch up to a power of two, so both cut contexts alike);
  - the scratch buffer is persistent and sized for `max_num_reqs`, so nothing is allocated
    except the output tensor, which comes from the graph's memory pool as usual.
"""

from __future__ import annotations

import torch

from ernieserve.attention.base import AttentionBackend, AttentionMetadata, KVCache, RopeInputs
from ernieserve.layers.norm import load_elementwise_kernel
from ernieserve.kernels.paged_attention import (
    choose_num_splits,
    decode_scratch_rows,
    paged_attention_decode,
    paged_attention_unified,
    store_kv_triton,
)

_DEFAULT_NUM_SMS = 8  # only used off-GPU (the Triton interpreter), where the split count is moot


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    fuses_rotary = True  # rotary and the KV store in one kernel (kernels/rotary.py)

    def __init__(
        self,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        # Head shapes are optional: given, `init_cuda_graph_state` allocates the decode scratch at
        # once; otherwise the first decode step allocates it (the runner's eager warm-up).
        self._heads = (num_heads, num_kv_heads, head_dim) if num_heads is not None else None
        self._num_sms: int | None = None
        self._max_graph_reqs = 0
        # flat fp32: per (request, head, split) a head_dim partial output and one log-sum-exp
        self._scratch: torch.Tensor | None = None
        self._scratch_pinned = False  # True once graphs may hold its address: never replace it then

    # ---- CUDA-graph hooks -------------------------------------------------------------------

    def supports_cuda_graph(self) -> bool:
        return True

    def init_cuda_graph_state(self, max_num_reqs: int, max_blocks_per_req: int, device: torch.device) -> None:
        del max_blocks_per_req  # the kernels read block tables in place; no copy to size
        self._max_graph_reqs = max_num_reqs
        self._scratch_pinned = True
        if self._heads is not None:
            num_heads, num_kv_heads, head_dim = self._heads
            self._scratch = self._alloc_scratch(max_num_reqs, num_heads, num_kv_heads, head_dim, torch.device(device))

    # ---- forward ----------------------------------------------------------------------------

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
        k_cache, v_cache = kv_cache
        if kv_stored:  # the qkv projection rotated q and stored K/V itself (kernels/gemv.py gemv_rope_store)
            assert rope is None
        elif rope is not None:  # rotate q in place, and k on its way into the cache: one launch
            rotary_kernels = load_elementwise_kernel("rotary")
            rotary_kernels.apply_rotary_and_store_kv_(rope.positions, query, key, value, rope.cos, rope.sin,
                                                      rope.interleaved, k_cache, v_cache, meta.slot_mapping)
        else:
            store_kv_triton(key, value, k_cache, v_cache, meta.slot_mapping)
        query = query if query.stride(-1) == 1 else query.contiguous()
        alloc = torch.zeros if meta.zero_unowned_rows else torch.empty
        out = alloc(query.shape, dtype=query.dtype, device=query.device)
        num_reqs = meta.num_reqs
        if meta.is_decode_only:
            self._decode(query, k_cache, v_cache, meta, scale, out)
            covered = num_reqs  # decode: request i's token is row i
        else:
            paged_attention_unified(
                query, k_cache, v_cache,
                meta.query_start_loc[: num_reqs + 1], meta.seq_lens[:num_reqs], meta.block_tables[:num_reqs],
                scale, out=out,
            )
            covered = meta.num_tokens
        if query.shape[0] > covered:  # padding rows that no request owns: keep them finite
            out[covered:].zero_()
        return out

    def _decode(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        num_reqs = meta.num_reqs
        _, num_heads, head_dim = query.shape
        num_kv_heads = k_cache.shape[2]
        num_splits = choose_num_splits(num_reqs, num_kv_heads, meta.max_seq_len, self._sms(query.device))
        scratch = None
        if num_splits > 1:
            scratch = self._scratch_for(num_reqs * num_heads * num_splits * (head_dim + 1), num_heads,
                                        num_kv_heads, head_dim, query.device)
        paged_attention_decode(
            query, k_cache, v_cache, meta.seq_lens[:num_reqs], meta.block_tables[:num_reqs],
            scale, num_splits, out=out, scratch=scratch,
        )

    # ---- scratch management -----------------------------------------------------------------

    def _sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            self._num_sms = (
                torch.cuda.get_device_properties(device).multi_processor_count
                if device.type == "cuda" else _DEFAULT_NUM_SMS
            )
        return self._num_sms

    def _alloc_scratch(
        self, max_reqs: int, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device
    ) -> torch.Tensor:
        rows = decode_scratch_rows(max(1, max_reqs), num_kv_heads, self._sms(device))
        return torch.empty(rows * num_heads * (head_dim + 1), dtype=torch.float32, device=device)

    def _scratch_for(
        self, need: int, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device
    ) -> torch.Tensor:
        """A flat fp32 buffer of at least `need` elements; the persistent one whenever it fits."""
        if self._scratch is not None and self._scratch.numel() >= need and self._scratch.device == device:
            return self._scratch
        fresh = self._alloc_scratch(self._max_graph_reqs, num_heads, num_kv_heads, head_dim, device)
        if fresh.numel() < need:  # a batch beyond the graph bound (eager only): size for it
            fresh = torch.empty(need, dtype=torch.float32, device=device)
        if self._scratch is None or not self._scratch_pinned:
            self._scratch = fresh
        return fresh
