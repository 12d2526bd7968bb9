"""Prefix caching in the block pool and scheduler, without a model."""

from __future__ import annotations

import random

import pytest

from ernieserve.config import CacheConfig, SchedulerConfig
from ernieserve.core.kv_cache_manager import KVCacheManager
from ernieserve.core.request import Request
from ernieserve.core.scheduler import ModelRunnerOutput, Scheduler
from ernieserve.sampling_params import SamplingParams


def make_scheduler(num_blocks: int = 32, block_size: int = 4, budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(8, budget, 256, True), CacheConfig(block_size, 0.9, None, 1.0, 0.0, 0.0, True),
                     num_blocks)


def req(rid: str, tokens: list[int], salt: str | None = None, **kw) -> Request:
    sp = SamplingParams(max_tokens=kw.pop("max_tokens", 2), temperature=0.0, **kw)
    return Request(rid, tokens, sp, [0], 0.0, max_tokens=sp.max_tokens, cache_salt=salt)


def run_to_end(s: Scheduler) -> None:
    while s.has_unfinished_requests():
        out = s.schedule()
        # scheduling advanced progress already; requests that sample have a token in flight
        sampled = {rid: [5] for rid in out.num_scheduled_tokens if s.requests[rid].num_inflight}
        s.update_from_output(ModelRunnerOutput(list(out.num_scheduled_tokens), sampled))


def test_shared_prefix_hits_full_blocks_only():
    s = make_scheduler()
    prefix = list(range(1, 11))  # 10 tokens: 2 full blocks of 4 + 2
    s.add_request(req("a", prefix + [20, 21]))
    run_to_end(s)
    s.add_request(req("b", prefix + [30, 31, 32]))
    out = s.schedule()
    new = out.new_reqs[0]
    assert new.num_computed_tokens == 8 and out.num_scheduled_tokens["b"] == 5
    assert s.requests["b"].num_cached_tokens == 8
    stats = s.stats()
    assert stats.prefix_cache_hits == 8


def test_full_prompt_hit_still_computes_the_last_block():
    s = make_scheduler()
    s.add_request(req("a", list(range(1, 9))))  # exactly 2 blocks
    run_to_end(s)
    s.add_request(req("b", list(range(1, 9))))
    out = s.schedule()
    # 8 tokens cached, but the last token's logits are needed: the second block is recomputed
    assert out.new_reqs[0].num_computed_tokens == 4 and out.num_scheduled_tokens["b"] == 4


def test_hit_blocks_are_shared_not_copied_and_ref_counted():
    s = make_scheduler()
    s.add_request(req("a", list(range(1, 14)), max_tokens=50))
    out = s.schedule()
    s.update_from_output(ModelRunnerOutput(["a"], {"a": [5]}))
    s.add_request(req("b", list(range(1, 14))))
    out = s.schedule()
    a_blocks = s.kv.req_blocks["a"]
    b_blocks = s.kv.req_blocks["b"]
    assert [b.block_id for b in b_blocks[:3]] == [b.block_id for b in a_blocks[:3]]
    assert all(b.ref_count == 2 for b in b_blocks[:3])


def test_cache_salt_separates_tenants():
    s = make_scheduler()
    s.add_request(req("a", list(range(1, 14)), salt="alice"))
    run_to_end(s)
    s.add_request(req("b", list(range(1, 14)), salt="bob"))
    out = s.schedule()
    assert out.new_reqs[0].num_computed_tokens == 0


def test_freed_blocks_stay_cached_until_evicted_lru():
    m = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    r1 = req("1", [1, 2, 3, 4, 9])
    r1.num_computed_tokens = 0
    assert m.allocate_slots(r1, 5) is not None
    r1.num_computed_tokens = 5
    m.cache_full_blocks(r1)
    m.free(r1)
    assert m.num_free_blocks == 4
    again = req("2", [1, 2, 3, 4, 7])
    assert len(m.find_cached_prefix(again)) == 2
    # allocating 3 fresh blocks evicts the uncached block first, then the least recently freed cached one
    filler = req("3", [50, 51, 52, 53, 54, 55])
    assert m.allocate_slots(filler, 6) is not None
    assert len(m.find_cached_prefix(req("4", [1, 2, 3, 4, 7]))) == 1


def test_hash_collision_is_rechecked():
    m = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    r1 = req("1", [1, 2, 3])
    m.allocate_slots(r1, 3)
    r1.num_computed_tokens = 3
    m.cache_full_blocks(r1)
    block = m.req_blocks["1"][0]
    block.token_ids = (99, 98)  # pretend the stored block holds other tokens under the same hash
    assert len(m.find_cached_prefix(req("2", [1, 2, 3]))) == 0


def test_prompt_logprobs_requests_skip_the_cache():
    s = make_scheduler()
    s.add_request(req("a", list(range(1, 14))))
    run_to_end(s)
    s.add_request(req("b", list(range(1, 14)), prompt_logprobs=1))
    assert s.schedule().new_reqs[0].num_computed_tokens == 0


# ---- the host tier (--swap-space) --------------------------------------------------------------
def computed(m: KVCacheManager, rid: str, tokens: list[int]) -> Request:
    """A request whose tokens are all computed and registered, then freed (its blocks stay cached)."""
    r = req(rid, tokens)
    assert m.allocate_slots(r, len(tokens)) is not None
    r.num_computed_tokens = len(tokens)
    m.cache_full_blocks(r)
    m.free(r)
    return r


def test_evicted_cached_blocks_go_to_the_host_tier():
    m = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True, num_host_blocks=4)
    computed(m, "1", [1, 2, 3, 4, 9])  # blocks 0, 1 cached; block 2 holds the partial [9]
    cached_ids = [b.block_id for b in m.pool.blocks if b.block_hash is not None]
    assert m.allocate_slots(req("f", list(range(50, 58))), 8) is not None  # takes all 4 blocks
    out, into = m.take_swaps()
    # the uncached block is reused silently; the cached ones are copied, in eviction (LRU) order
    assert sorted(d for d, _ in out) == sorted(cached_ids) and [h for _, h in out] == [0, 1] and into == []
    assert m.take_swaps() == ([], [])  # taken once
    hits = m.find_cached_prefix(req("2", [1, 2, 3, 4, 7]))
    assert len(hits) == 2 and hits.num_host == 2


def test_host_hit_is_copied_back_and_indexed_on_the_device():
    m = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True, num_host_blocks=4)
    computed(m, "1", [1, 2, 3, 4, 9])
    filler = req("f", list(range(50, 58)))
    m.allocate_slots(filler, 8)
    m.take_swaps()
    m.free(filler)
    again = req("2", [1, 2, 3, 4, 7])
    hits = m.find_cached_prefix(again)
    again.num_computed_tokens = 4
    ids = m.allocate_slots(again, 1, hits)
    assert ids is not None and len(ids) == 3
    out, into = m.take_swaps()
    # host block -> the request's device block, in prefix order (the tail block was evicted first)
    assert into == [(1, ids[0]), (0, ids[1])]
    m.record_lookup(again, hits)
    assert m.hits == 4 and m.host_hits == 4 and m.num_swapped_in == 2
    # a third request now finds them on the device: shared, no second copy
    third = m.find_cached_prefix(req("3", [1, 2, 3, 4, 8]))
    assert third.num_host == 0 and [b.block_id for b in third.blocks] == ids[:2]
    # the tier is inclusive: evicting the copied-back blocks again costs no copy
    m.free(again)
    m.allocate_slots(req("g", list(range(60, 68))), 8)
    out, _ = m.take_swaps()
    assert all(d not in ids[:2] for d, _ in out)


def test_host_tier_is_lru():
    m = KVCacheManager(num_blocks=2, block_size=2, enable_caching=True, num_host_blocks=2)
    for i, first in enumerate((10, 20, 30)):  # three one-block prefixes pass through a two-block tier
        computed(m, f"p{i}", [first, first + 1, 0])
        if i == 1:  # touch the first one: a hit on the host makes it most recently used
            hits = m.find_cached_prefix(req("t", [10, 11, 5]))
            assert hits.num_host == 1
            r = req("t", [10, 11, 5])
            r.num_computed_tokens = 2
            m.allocate_slots(r, 1, hits)
            m.free(r)
        filler = req(f"f{i}", [90 + i] * 4)
        m.allocate_slots(filler, 4)  # evict everything cached on the device
        m.take_swaps()
        m.free(filler)
    assert m.find_cached_prefix(req("a", [10, 11, 5])).num_host == 1  # touched: kept
    assert len(m.find_cached_prefix(req("b", [20, 21, 5]))) == 0  # least recently used: dropped
    assert m.find_cached_prefix(req("c", [30, 31, 5])).num_host == 1


def test_host_hit_rechecks_tokens():
    m = KVCacheManager(num_blocks=2, block_size=2, enable_caching=True, num_host_blocks=2)
    computed(m, "1", [1, 2, 3])
    m.allocate_slots(req("f", [7, 7, 7, 7]), 4)
    m.take_swaps()
    assert m.find_cached_prefix(req("2", [1, 2, 3])).num_host == 1
    m.host.blocks[0].token_ids = (99, 98)  # another block's tokens under the same hash
    assert len(m.find_cached_prefix(req("3", [1, 2, 3]))) == 0


def test_full_tier_drops_and_never_overwrites_a_block_read_this_step():
    m = KVCacheManager(num_blocks=2, block_size=2, enable_caching=True, num_host_blocks=1)
    computed(m, "a", [1, 2, 0])
    filler = req("f", [7, 8, 0])
    m.allocate_slots(filler, 3)  # evicts [1, 2] to the single host block
    assert m.take_swaps()[0] != []
    filler.num_computed_tokens = 3
    m.cache_full_blocks(filler)  # [7, 8] cached on the device
    m.free(filler)
    # [1, 2] comes back from the host; its destination block is found by evicting [7, 8], which
    # finds the tier's only block pinned (being read) and is dropped instead of overwriting it
    r = req("b", [1, 2, 5])
    hits = m.find_cached_prefix(r)
    r.num_computed_tokens = 2
    ids = m.allocate_slots(r, 1, hits)
    out, into = m.take_swaps()
    assert out == [] and into == [(0, ids[0])]
    assert len(m.find_cached_prefix(req("c", [7, 8, 5]))) == 0
    assert m.find_cached_prefix(req("d", [1, 2, 5])).num_host == 0  # on the device now


def test_scheduler_output_carries_the_copies_and_stats():
    s = Scheduler(SchedulerConfig(8, 64, 256, True), CacheConfig(4, 0.9, None, 1.0, 0.0, 1.0, True), 4,
                  num_host_blocks=8)
    prefix = list(range(1, 13))  # 3 full blocks
    s.add_request(req("a", prefix + [40]))
    run_to_end(s)
    s.add_request(req("f", list(range(100, 114))))  # needs all 4 device blocks: a's blocks are evicted
    out = s.schedule()
    assert len(out.swap_out) == 3 and out.swap_in == []
    s.update_from_output(ModelRunnerOutput(["f"], {"f": [5]}))
    run_to_end(s)
    s.add_request(req("b", prefix + [41]))
    out = s.schedule()
    assert out.new_reqs[0].num_computed_tokens == 12 and out.num_scheduled_tokens["b"] == 1
    assert [d for _, d in out.swap_in] == out.new_reqs[0].block_ids[:3]
    stats = s.stats()
    assert stats.prefix_cache_host_hits == 12 and stats.num_swapped_in_blocks_total == 3
    assert stats.num_swapped_out_blocks_total >= 3 and stats.num_host_blocks == 8


# ---- property test: random traffic through both tiers, against a simulated KV cache ------------
class FakeWorker:
    """Stands in for the model runner, with overlapped steps like the real one: a step's sampled
    tokens come back with the next step. A block's "KV" is the (position, token) written in each
    slot, so reading a slot checks that the block tables and the copies put the right KV there."""

    def __init__(self, num_blocks: int, num_host: int, block_size: int, rng: random.Random) -> None:
        self.bs = block_size
        self.dev: list[list[tuple[int, int] | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.host: list[list[tuple[int, int] | None]] = [[None] * block_size for _ in range(num_host)]
        self.states: dict[str, tuple[list[int], list[int]]] = {}  # id -> (tokens, block ids)
        self.computed: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.rng = rng

    def execute(self, sched) -> ModelRunnerOutput:
        for d, h in sched.swap_out:  # all swap-outs, then all swap-ins
            self.host[h] = list(self.dev[d])
        for h, d in sched.swap_in:
            self.dev[d] = list(self.host[h])
        prev = ModelRunnerOutput(list(self.pending), {rid: [t] for rid, t in self.pending.items()})
        for rid, t in self.pending.items():
            if rid in self.states:
                self.states[rid][0].append(t)
        self.pending = {}
        for rid in sched.finished_req_ids:
            self.states.pop(rid, None)
        for new in sched.new_reqs:
            self.states[new.request_id] = (new.prompt_token_ids + new.output_token_ids, list(new.block_ids))
            self.computed[new.request_id] = new.num_computed_tokens
        for c in sched.cached_reqs:
            self.states[c.request_id][1].extend(c.new_block_ids)
            self.computed[c.request_id] = c.num_computed_tokens
        for rid, n in sched.num_scheduled_tokens.items():
            self._run(rid, n)
        return prev

    def _run(self, rid: str, n: int) -> None:
        tokens, blocks = self.states[rid]
        start = self.computed[rid]
        for pos in range(start):  # attention reads the context
            assert self.dev[blocks[pos // self.bs]][pos % self.bs] == (pos, tokens[pos]), (rid, pos)
        for pos in range(start, start + n):
            self.dev[blocks[pos // self.bs]][pos % self.bs] = (pos, tokens[pos])
        self.computed[rid] = start + n
        if start + n == len(tokens):
            self.pending[rid] = self.rng.choice([0] + list(range(1, 9)) * 4)  # 0 is eos


def check_invariants(s: Scheduler, w: FakeWorker) -> None:
    kv = s.kv
    holders: dict[int, int] = {}
    for blocks in kv.req_blocks.values():
        for b in blocks:
            holders[b.block_id] = holders.get(b.block_id, 0) + 1
    for b in kv.pool.blocks:
        assert b.ref_count == holders.get(b.block_id, 0), f"block {b.block_id}: ref count != holders"
        assert (b.block_id in kv.pool._free) == (b.ref_count == 0)
    for h, b in kv.pool._cached.items():  # cached device blocks hold their tokens' KV
        assert b.block_hash == h and [slot[1] for slot in w.dev[b.block_id]] == list(b.token_ids)
    host = kv.host
    if host is None:  # no --swap-space: a device-only cache
        return
    assert not host._pinned and len(host._empty) + len(host._cached) == host.num_blocks
    assert set(host._lru) == {b.block_id for b in host._cached.values()}
    for h, b in host._cached.items():  # so do cached host blocks: the copies moved the right data
        assert b.block_hash == h and [slot[1] for slot in w.host[b.block_id]] == list(b.token_ids)


@pytest.mark.parametrize("seed", range(12))
def test_random_traffic_keeps_both_tiers_consistent(seed):
    rng = random.Random(seed)
    bs, num_blocks, num_host = 4, rng.randint(10, 24), rng.randint(1, 16)
    s = Scheduler(SchedulerConfig(6, rng.choice([8, 16, 64]), 64, True),
                  CacheConfig(bs, 0.9, None, 1.0, 0.0, 1.0, True), num_blocks, num_host_blocks=num_host)
    w = FakeWorker(num_blocks, num_host, bs, rng)
    prefixes = [[rng.randint(1, 50) for _ in range(rng.randint(4, 24))] for _ in range(3)]
    added = 0
    for _ in range(300):
        if added < 60 and rng.random() < 0.3:
            tokens = rng.choice(prefixes) + [rng.randint(1, 50) for _ in range(rng.randint(0, 6))]
            salt = "x" if rng.random() < 0.1 else None
            s.add_request(req(f"r{added}", tokens[:40], salt, max_tokens=rng.randint(1, 12)))
            added += 1
        if s.requests and rng.random() < 0.03:
            s.abort_requests([rng.choice(list(s.requests))])
        if not (s.has_unfinished_requests() or w.pending):
            continue
        out = s.schedule()
        s.update_from_output(w.execute(out))
        check_invariants(s, w)
    while s.has_unfinished_requests() or w.pending:
        s.update_from_output(w.execute(s.schedule()))
        check_invariants(s, w)
    assert s.kv.num_free_blocks == num_blocks and not s.kv.req_blocks  # nothing leaked
    assert s.stats().num_swapped_out_blocks_total > 0


def test_random_traffic_brings_blocks_back_from_the_host():
    swapped_in = 0
    for seed in range(12):
        rng = random.Random(seed)
        s = Scheduler(SchedulerConfig(4, 32, 64, True), CacheConfig(4, 0.9, None, 1.0, 0.0, 1.0, True), 12,
                      num_host_blocks=32)
        w = FakeWorker(12, 32, 4, rng)
        prefix = [rng.randint(1, 50) for _ in range(16)]
        for i in range(20):
            s.add_request(req(f"r{i}", (prefix if i % 2 else [rng.randint(1, 50) for _ in range(16)]) + [i],
                              max_tokens=3))
            s.update_from_output(w.execute(s.schedule()))
            check_invariants(s, w)
        while s.has_unfinished_requests() or w.pending:
            s.update_from_output(w.execute(s.schedule()))
            check_invariants(s, w)
        swapped_in += s.stats().num_swapped_in_blocks_total
    assert swapped_in > 0
