"""Prefix caching in the block pool and scheduler, without a model."""

from __future__ import annotations

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
    assert m.find_cached_prefix(req("2", [1, 2, 3])) == []


def test_prompt_logprobs_requests_skip_the_cache():
    s = make_scheduler()
    s.add_request(req("a", list(range(1, 14))))
    run_to_end(s)
    s.add_request(req("b", list(range(1, 14)), prompt_logprobs=1))
    assert s.schedule().new_reqs[0].num_computed_tokens == 0
