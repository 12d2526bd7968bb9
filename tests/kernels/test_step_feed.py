"""The in-graph feed kernel (kernels/step_feed.py) against its torch ops and a loop, in Triton's
interpreter: used and unused pairs, unused pairs whose positions are stale or repeat a used one,
more pairs than one program takes."""

from __future__ import annotations

import pytest
import torch

from interpreter import require_interpreter  # noqa: E402 (tests/kernels)

triton = require_interpreter()

from ernieserve.kernels import step_feed  # noqa: E402
from ernieserve.worker.cuda_graph import feed_prev_ids_torch  # noqa: E402


def _reference(ids: torch.Tensor, feed: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    out = ids.clone()
    for pos, src in feed.t().tolist():
        if src >= 0:
            out[pos] = prev[src]
    return out


@pytest.mark.parametrize("tokens, pairs, used, seed", [(1, 1, 1, 0), (8, 8, 3, 1), (40, 16, 0, 2),
                                                       (600, 300, 280, 3)])
def test_feed_kernel_equals_reference(tokens, pairs, used, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (tokens,), generator=g)
    prev = torch.randint(1000, 2000, (max(pairs, 1) + 3,), generator=g)
    feed = torch.empty(2, pairs, dtype=torch.int32)
    feed[0] = torch.randint(0, tokens, (pairs,), generator=g)  # stale positions on the unused pairs
    feed[0, :used] = torch.randperm(tokens, generator=g)[:used]
    feed[1] = -1
    feed[1, :used] = torch.randint(0, prev.numel(), (used,), generator=g)
    feed = feed[:, torch.randperm(pairs, generator=g)].contiguous()  # used pairs anywhere
    expected = _reference(ids, feed, prev)
    got = ids.clone()
    step_feed.feed_prev_ids(got, feed, prev)
    assert torch.equal(got, expected)
    fallback = ids.clone()
    feed_prev_ids_torch(fallback, feed, prev)
    assert torch.equal(fallback, expected)


def test_feed_kernel_on_a_slice_of_the_pairs():
    """A decode graph of size bs passes feed[:, :bs] of the [2, max_bs] buffer (row stride max_bs)."""
    ids = torch.zeros(8, dtype=torch.int64)
    feed = torch.tensor([[3, 1, 5, 7], [0, 1, 2, 3]], dtype=torch.int32)
    step_feed.feed_prev_ids(ids, feed[:, :2], torch.tensor([10, 11, 12, 13]))
    assert ids.tolist() == [0, 11, 0, 10, 0, 0, 0, 0]
