"""The graph runners' host side, on CPU: the packed input buffer (one upload), the block table in it
or beside it, and the in-flight feed resolved inside the graph from the runners' shared `sampled`
buffer.

`PackedInputs` runs as on CUDA but with unpinned host buffers and no events. The runner tests
replay each "graph" by running its captured function eagerly, with a model whose greedy pick is a
known function of its input id, so that every step's input ids (host ids and fed ones) can be read
back from what it sampled.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ernieserve.worker import cuda_graph
from ernieserve.worker.cuda_graph import (CudaGraphRunner, PackedInputs, feed_inputs, feed_prev_ids_torch,
                                          stage_sampling_and_feed)
from ernieserve.worker.input_batch import StepInputs

CPU = torch.device("cpu")
FIELDS = {"keys": ((3,), torch.int64), "b": ((5,), torch.int32), "c": ((2, 3), torch.int64),
          "temperature": ((5,), torch.float32), "feed": ((2, 4), torch.int32)}


def _fill(host: dict[str, np.ndarray], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, view in host.items():
        if name != PackedInputs.TABLE:
            view[...] = rng.integers(-1000, 1000, view.shape) if view.dtype.kind == "i" else rng.random(view.shape)


# ---- PackedInputs ---------------------------------------------------------------------------------

def test_fields_are_aligned_views_of_one_buffer():
    p = PackedInputs(FIELDS, CPU, table=(4, 6))
    words = 0
    for name, (shape, dtype) in FIELDS.items():
        view = p.device_views[name]
        assert view.shape == shape and view.dtype == dtype and view.is_contiguous()
        assert view.untyped_storage().data_ptr() == p._dev.untyped_storage().data_ptr()
        offset = (view.data_ptr() - p._dev.data_ptr()) // 4
        assert offset % 4 == 0 and offset >= words, name  # 16-byte aligned, in order, no overlap
        words = offset + view.numel() * dtype.itemsize // 4
    table = p.device_views[PackedInputs.TABLE]
    assert table.shape == (4, 6) and table.dtype == torch.int32
    assert (table.data_ptr() - p._dev.data_ptr()) // 4 == p.head_words >= words and p.head_words % 4 == 0
    assert p._dev.numel() == p.head_words + 4 * 6


def test_one_upload_carries_every_field_and_the_used_table_prefix():
    p = PackedInputs(FIELDS, CPU, table=(4, 6))
    assert p.host_table_rows == 4  # 4 x 6 words fit the default cap
    host = p.next_host()
    _fill(host, 0)
    p._dev.fill_(-7)
    table = np.arange(1, 3 * 5 + 1, dtype=np.int32).reshape(3, 5)  # 3 requests, 5 blocks each
    words = p.upload(table)
    assert words == p.head_words + 2 * 6 + 5  # two whole rows, then the third's 5 entries
    assert torch.equal(p._dev[words:], torch.full((p._dev.numel() - words,), -7, dtype=torch.int32))  # not copied
    for name in FIELDS:
        assert np.array_equal(p.device_views[name].numpy(), host[name]), name
    assert np.array_equal(p.device_views[PackedInputs.TABLE][:3, :5].numpy(), table)


def test_a_table_too_big_for_the_host_buffers_takes_a_second_copy():
    p = PackedInputs(FIELDS, CPU, table=(4, 6), table_cap_bytes=2 * 6 * 4)  # room for 2 rows
    assert p.host_table_rows == 2
    host = p.next_host()
    assert host[PackedInputs.TABLE].shape == (2, 6)
    _fill(host, 1)
    table = np.arange(100, 118, dtype=np.int32).reshape(3, 6)
    assert p.upload(table) == p.head_words  # the fields only; the table went by itself
    assert np.array_equal(p.device_views[PackedInputs.TABLE][:3].numpy(), table)
    assert np.array_equal(p.device_views["c"].numpy(), host["c"])
    small = np.array([[9, 8]], dtype=np.int32)  # then a small one rides along again
    p.next_host()
    assert p.upload(small) == p.head_words + 2
    assert p.device_views[PackedInputs.TABLE][0, :2].tolist() == [9, 8]
    assert p.device_views[PackedInputs.TABLE][1].tolist() == table[1].tolist()  # older rows stay


def test_rows_longer_than_the_cap_always_go_separately():
    p = PackedInputs(FIELDS, CPU, table=(4, 10_000), table_cap_bytes=16 * 1024)
    assert p.host_table_rows == 0 and p._hosts[0][0].numel() == p.head_words
    p.next_host()
    table = np.full((4, 9_000), 3, dtype=np.int32)
    assert p.upload(table) == p.head_words
    assert bool((p.device_views[PackedInputs.TABLE][:, :9_000] == 3).all())


def test_host_buffers_rotate_over_three():
    p = PackedInputs(FIELDS, CPU)
    seen = []
    for _ in range(4):
        seen.append(p.next_host()["keys"].ctypes.data)
        assert p.upload() == p.head_words
    assert len(set(seen[:3])) == 3 and seen[3] == seen[0]


def test_stage_feed_clears_the_pairs_of_an_earlier_step():
    host = PackedInputs(FIELDS, CPU).next_host()
    step = _step([0, 0, 7], inflight_pos=[0, 1], inflight_src=[3, 2])
    assert stage_sampling_and_feed(host, step, (np.zeros(3, np.float32), np.arange(3)), 3) == 2
    assert host["feed"].tolist() == [[0, 1, 0, 0], [3, 2, -1, -1]]
    assert host["keys"][:3].tolist() == [0, 1, 2]
    assert stage_sampling_and_feed(host, _step([4]), None, 1) == 0
    assert host["feed"].tolist() == [[0, 0, 0, 0], [-1, -1, -1, -1]]


# ---- the feed -------------------------------------------------------------------------------------

def _feed_reference(ids: torch.Tensor, feed: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    out = ids.clone()
    for pos, src in feed.t().tolist():
        if src >= 0:
            out[pos] = prev[src]
    return out


def test_torch_feed_takes_used_pairs_only():
    ids = torch.arange(10, 20)
    prev = torch.arange(100, 106)
    # pairs 1 and 3 unused; pair 3's position is a used pair's too (its -1 must not win)
    feed = torch.tensor([[4, 9, 0, 4, 7], [5, -1, 2, -1, 0]], dtype=torch.int32)
    expected = _feed_reference(ids, feed, prev)
    feed_prev_ids_torch(ids, feed, prev)
    assert torch.equal(ids, expected) and ids[[0, 4, 7]].tolist() == [102, 105, 100]


def test_feed_inputs_copies_only_when_the_ids_are_elsewhere():
    sampled = torch.arange(8)
    assert not feed_inputs(sampled, None, 0)
    assert not feed_inputs(sampled, sampled[:3], 2)  # the previous graph step's view
    assert torch.equal(sampled, torch.arange(8))
    assert feed_inputs(sampled, torch.tensor([50, 51]), 1)  # an eager step's own tensor
    assert sampled.tolist() == [50, 51, 2, 3, 4, 5, 6, 7]
    with pytest.raises(AssertionError):
        feed_inputs(torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 1)


# ---- the runners, their graphs replayed eagerly ---------------------------------------------------

V = 97


def _next(token: int) -> int:
    """What the echo model samples after `token` (greedy)."""
    return (7 * token + 1) % V


class Echo(torch.nn.Module):
    """hidden = the input id; logits one-hot at _next(id). Records each forward's inputs."""

    uses_mrope = False

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def forward(self, ids, positions, meta):
        self.seen.append({"ids": ids.tolist(), "table": meta.block_tables.clone(), "seq_lens": meta.seq_lens.tolist(),
                          "slots": meta.slot_mapping.tolist()})
        return ids.to(torch.float32)[:, None]

    def compute_logits(self, hidden):
        return torch.nn.functional.one_hot((hidden[:, 0].long() * 7 + 1) % V, V).to(torch.float32) * 10


class FakeGraph:
    def __init__(self, forward, size: int) -> None:
        self.forward, self.size = forward, size

    def replay(self) -> None:
        self.forward(self.size)


def _step(ids: list[int], inflight_pos=(), inflight_src=(), width: int = 2, qsl=None) -> StepInputs:
    n = len(ids) if qsl is None else len(qsl) - 1
    tokens = len(ids)
    qsl = np.arange(n + 1, dtype=np.int32) if qsl is None else np.asarray(qsl, dtype=np.int32)
    table = (np.arange(n * width, dtype=np.int32).reshape(n, width) + 1) * 3
    return StepInputs([f"r{i}" for i in range(n)], np.asarray(ids, dtype=np.int64), np.arange(tokens) + 20,
                      np.arange(tokens, dtype=np.int64) + 100, qsl, np.diff(qsl).astype(np.int32) + 20, table,
                      list(range(n)), list(inflight_pos), list(inflight_src))


def _greedy(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.int64)


@pytest.fixture(params=["triton", "torch"])
def runners(monkeypatch, request):
    """(decode runner, mixed runner sharing its sampled buffer, copies feed_inputs made); the graphs'
    feed is the Triton kernel (interpreted) or its torch ops."""
    if "TRITON_INTERPRET" not in os.environ:
        pytest.skip("the race kernel runs in Triton's interpreter here (tests/conftest.py sets it on CPU)")
    pytest.importorskip("triton")
    from ernieserve.worker import mixed_graph

    copies: list[bool] = []

    def counted(sampled, prev, num_fed):
        copies.append(feed_inputs(sampled, prev, num_fed))
        return copies[-1]

    monkeypatch.setattr(cuda_graph, "feed_inputs", counted)
    monkeypatch.setattr(mixed_graph, "feed_inputs", counted)
    model = Echo()
    decode = CudaGraphRunner(model, None, [1, 2, 4, 8], 64, 16, CPU, sampled_rows=8)
    decode.graphs = {bs: FakeGraph(decode._forward, bs) for bs in decode.sizes}
    mixed = mixed_graph.MixedGraphRunner(model, None, 16, 8, 64, 16, CPU, sampled=decode.sampled)
    mixed.graphs = {t: FakeGraph(mixed._forward, t) for t in mixed.sizes}
    assert decode.samples and decode.sampled.numel() == 8 and mixed.sampled is decode.sampled
    if request.param == "torch":
        decode._feed_ids = mixed._feed_ids = feed_prev_ids_torch
    else:
        assert decode._feed_ids is not feed_prev_ids_torch
    return decode, mixed, copies


def test_decode_steps_feed_from_the_previous_replay_without_copies(runners):
    decode, _, copies = runners
    model = decode.model
    decode.run(_step([5, 9, 2]), None, _greedy(3))
    prev = decode.sampled[:3]  # what the model runner keeps: a view
    assert prev.tolist() == [_next(5), _next(9), _next(2)]
    decode.run(_step([0, 0, 0], [0, 1, 2], [0, 1, 2]), prev, _greedy(3))
    assert model.seen[-1]["ids"][:3] == [_next(5), _next(9), _next(2)]
    prev = decode.sampled[:3]
    # five requests (graph size 8): two new ones, three fed in another order
    step = _step([0, 40, 0, 41, 0], [0, 2, 4], [2, 0, 1], width=4)
    decode.run(step, prev, _greedy(5))
    seen = model.seen[-1]
    assert seen["ids"][:5] == [_next(_next(2)), 40, _next(_next(5)), 41, _next(_next(9))]
    assert len(seen["ids"]) == 8 and seen["seq_lens"][5:] == [0, 0, 0] and seen["slots"][5:] == [-1, -1, -1]
    assert torch.equal(seen["table"][:5, :4], torch.from_numpy(step.block_table))
    assert copies == [False, False, False]
    # after an eager step (its own tensor): one copy into the buffer, then the graph feeds from it
    decode.run(_step([0], [0], [4]), torch.tensor([70, 71, 72, 73, 74]), _greedy(1))
    assert model.seen[-1]["ids"] == [74] and copies[-1] is True


def test_decode_and_mixed_graphs_feed_each_other_through_the_shared_buffer(runners):
    decode, mixed, copies = runners
    model = decode.model
    decode.run(_step([5, 9]), None, _greedy(2))
    prev = decode.sampled[:2]
    # a mixed step: request 0 a 3-token prompt chunk, request 1 a decode of the token in flight
    logits = mixed.run(_step([1, 2, 3, 0], [3], [1], qsl=[0, 3, 4]), prev, _greedy(2))
    assert logits.shape == (2, V)
    assert model.seen[-1]["ids"][:4] == [1, 2, 3, _next(9)]
    prev = mixed.sampled[:2]
    assert prev.tolist() == [_next(3), _next(_next(9))]
    decode.run(_step([0, 0], [0, 1], [1, 0]), prev, _greedy(2))
    assert model.seen[-1]["ids"][:2] == [_next(_next(9)), _next(3)]
    assert copies == [False, False, False]


def test_a_mixed_runner_with_its_own_buffer_gets_a_copy(runners):
    decode, mixed, copies = runners
    from ernieserve.worker.mixed_graph import MixedGraphRunner

    own = MixedGraphRunner(decode.model, None, 16, 8, 64, 16, CPU)
    own._feed_ids = mixed._feed_ids
    own.graphs = {t: FakeGraph(own._forward, t) for t in own.sizes}
    assert own.sampled.data_ptr() != decode.sampled.data_ptr()
    decode.run(_step([5, 9]), None, _greedy(2))
    own.run(_step([1, 0], [1], [1], qsl=[0, 1, 2]), decode.sampled[:2], _greedy(2))
    assert decode.model.seen[-1]["ids"][:2] == [1, _next(9)] and copies == [False, True]


def test_block_tables_ride_in_the_upload(runners):
    """At these sizes the whole table fits: the step's one upload carries it."""
    decode, _, _ = runners
    assert decode.inputs.host_table_rows == decode.max_bs
    step = _step([5, 6, 7], width=3)
    decode.run(step, None, _greedy(3))
    assert torch.equal(decode.block_tables[:3, :3], torch.from_numpy(step.block_table))
    assert decode.block_tables.data_ptr() == decode.inputs.device_views[PackedInputs.TABLE].data_ptr()
