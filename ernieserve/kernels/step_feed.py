"""The in-flight token feed, as the first kernel of a decode or mixed step's CUDA graph.

A step is launched before the host has read the previous step's sampled ids (worker/model_runner.py),
so a request's newest input token may exist on the device only. The graph runners list such tokens
as pairs in their packed inputs: `feed[0, j]` the token's row in the input ids, `feed[1, j]` its row
in the previous step's sampled ids, -1 for an unused pair. This kernel writes

    ids[feed[0, j]] = prev[feed[1, j]]        for every j with feed[1, j] >= 0

in one launch inside the graph, instead of an index_select and an index_copy_ between replays. It
reads `prev` (the runners' shared `sampled` buffer, which the previous replay's sampling race
wrote) before this step's race overwrites it: both are in the same stream, the race last.
Positions of unused pairs are never read. No PDL: the kernel before it is the previous replay's
(or the host copy), and the model's first kernels wait for it as for any plain launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256  # pairs per program: one program up to 256 requests


@triton.jit
def _feed_kernel(ids_ptr, pos_ptr, src_ptr, prev_ptr, pairs, BLOCK: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(src_ptr + j, mask=j < pairs, other=-1)
    take = src >= 0
    pos = tl.load(pos_ptr + j, mask=take, other=0)
    val = tl.load(prev_ptr + src, mask=take, other=0)
    tl.store(ids_ptr + pos, val, mask=take)


def feed_prev_ids(ids: torch.Tensor, feed: torch.Tensor, prev: torch.Tensor) -> None:
    """ids [T] int64 (in place), feed [2, P] int32 (row 1's -1 entries unused), prev [R] int64."""
    assert feed.dim() == 2 and feed.shape[0] == 2 and feed.stride(1) == 1
    assert ids.dim() == 1 and ids.stride(0) == 1 and prev.dim() == 1 and prev.stride(0) == 1
    pairs = feed.shape[1]
    if pairs == 0:
        return
    _feed_kernel[(triton.cdiv(pairs, BLOCK),)](ids, feed[0], feed[1], prev, pairs, BLOCK=BLOCK, num_warps=1)
