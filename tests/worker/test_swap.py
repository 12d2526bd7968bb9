"""The swapper's copies between the device cache and the host tier, on CPU tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ernieserve.worker.swap import KVSwapper, block_runs

L, BS, H, D = 3, 4, 2, 5


def make(num_blocks: int = 10, num_host: int = 12, staging: int = 3) -> KVSwapper:
    cache = torch.randn(L, 2, num_blocks, BS, H, D)  # [layers, K/V, blocks, block_size, heads, head_dim]
    host = torch.full((num_host, L, 2, BS, H, D), float("nan"))
    return KVSwapper(cache, host, staging)


def test_block_runs():
    assert block_runs([]) == []
    assert block_runs([4, 5, 6, 9, 2, 3]) == [(0, 4, 3), (3, 9, 1), (4, 2, 2)]
    assert block_runs([7, 7]) == [(0, 7, 1), (1, 7, 1)]


@pytest.mark.parametrize("staging", [1, 2, 3, 16])
def test_swap_out_then_in_moves_whole_blocks_of_every_layer(staging):
    s = make(staging=staging)
    before = s.cache.clone()
    out = [(7, 3), (2, 4), (5, 0), (9, 11), (0, 5)]  # (device, host): out of order, with runs
    s.swap(out, [])
    for d, h in out:
        assert torch.equal(s.host[h], before[:, :, d]), (d, h)
    s.cache.zero_()
    into = [(h, d) for d, h in out][::-1]  # bring them back to the same blocks
    s.swap([], into)
    for d, _ in out:
        assert torch.equal(s.cache[:, :, d], before[:, :, d])
    untouched = [b for b in range(10) if b not in {d for d, _ in out}]
    assert not s.cache[:, :, untouched].any()


def test_a_step_does_swap_outs_before_swap_ins():
    s = make()
    before = s.cache.clone()
    s.swap([(1, 0)], [])  # step 1: block 1 -> host 0
    # step 2: block 4 is evicted to host 2 and becomes the destination of host 0's block
    s.swap([(4, 2)], [(0, 4)])
    assert torch.equal(s.host[2], before[:, :, 4])
    assert torch.equal(s.cache[:, :, 4], before[:, :, 1])


def test_two_swap_outs_into_one_host_block_keep_their_order():
    s = make(staging=2)
    before = s.cache.clone()
    s.swap([(3, 5), (1, 6), (8, 5)], [])  # host 5 reused within the step: the later copy wins
    assert torch.equal(s.host[5], before[:, :, 8]) and torch.equal(s.host[6], before[:, :, 1])


def test_step_marks_are_a_no_op_on_cpu():
    s = make()
    s.step_launched(np.zeros((1, 1), dtype=np.int32))
    s.before_forward()
    assert s.stream is None
