"""Token-budget scheduler and block bookkeeping, without a model."""

from __future__ import annotations

from ernieserve.config import CacheConfig, SchedulerConfig
from ernieserve.core.request import Request, RequestStatus
from ernieserve.core.scheduler import ModelRunnerOutput, Scheduler
from ernieserve.engine.protocol import FinishReason
from ernieserve.sampling_params import SamplingParams


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_seqs: int = 8, budget: int = 32,
                   max_len: int = 256, chunked: bool = True, ratio: float = 1.0) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len, chunked),
                     CacheConfig(block_size, 0.9, None, ratio, 0.0, 0.0, False), num_blocks)


def make_request(rid: str, prompt_len: int, max_tokens: int = 4, **params) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)
    return Request(rid, list(range(1, prompt_len + 1)), sp, eos_token_ids=[0], arrival_time=0.0,
                   max_tokens=max_tokens)


def fake_run(sched: Scheduler, token: int = 7):
    """One step where every request that reaches the end of its known tokens samples `token`."""
    out = sched.schedule()
    # scheduling advanced progress already; requests that sample have a token in flight
    sampled = {rid: [token] for rid in out.num_scheduled_tokens if sched.requests[rid].num_inflight}
    return out, sched.update_from_output(ModelRunnerOutput(list(out.num_scheduled_tokens), sampled))


def test_prefill_then_decode_shares_budget():
    s = make_scheduler(budget=16)
    s.add_request(make_request("a", 10))
    out, _ = fake_run(s)
    assert out.num_scheduled_tokens == {"a": 10}
    s.add_request(make_request("b", 20))
    out, _ = fake_run(s)
    # decode of a (1 token) and the first 15-token chunk of b share the step
    assert out.num_scheduled_tokens == {"a": 1, "b": 15}
    out, _ = fake_run(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 5}


def test_chunked_prefill_does_not_sample_until_prompt_done():
    s = make_scheduler(budget=8)
    s.add_request(make_request("a", 20))
    _, outputs = fake_run(s)
    assert outputs == [] and s.requests["a"].num_computed_tokens == 8
    _, outputs = fake_run(s)
    assert outputs == []
    _, outputs = fake_run(s)
    assert [o.new_token_ids for o in outputs] == [[7]]


def test_no_chunking_waits_for_budget():
    s = make_scheduler(budget=16, chunked=False)
    s.add_request(make_request("a", 10))
    s.add_request(make_request("b", 10))
    out, _ = fake_run(s)
    assert list(out.num_scheduled_tokens) == ["a"]


def test_max_num_seqs_limits_running():
    s = make_scheduler(max_seqs=2)
    for i in range(4):
        s.add_request(make_request(str(i), 3))
    out, _ = fake_run(s)
    assert list(out.num_scheduled_tokens) == ["0", "1"] and len(s.waiting) == 2


def test_finish_on_max_tokens_eos_and_stop_ids_frees_blocks():
    s = make_scheduler()
    s.add_request(make_request("len", 3, max_tokens=2))
    s.add_request(make_request("eos", 3, max_tokens=5))
    s.add_request(make_request("stop", 3, max_tokens=5, stop_token_ids=[9], ignore_eos=True))
    fake_run(s, token=5)
    _, outs = fake_run(s, token=5)
    assert {o.request_id: o.finish_reason for o in outs}["len"] == FinishReason.LENGTH
    _, outs = fake_run(s, token=0)
    assert {o.request_id: o.finish_reason for o in outs} == {"eos": FinishReason.STOP, "stop": None}
    _, outs = fake_run(s, token=9)
    assert outs[0].finish_reason == FinishReason.STOP and outs[0].stop_reason == 9
    assert not s.has_unfinished_requests() and s.kv.num_free_blocks == 64


def test_min_tokens_defers_eos_and_ignore_eos():
    s = make_scheduler()
    s.add_request(make_request("m", 3, max_tokens=5, min_tokens=3))
    s.add_request(make_request("i", 3, max_tokens=3, ignore_eos=True))
    outs = []
    for _ in range(3):
        outs += fake_run(s, token=0)[1]
    finished = {o.request_id: o.finish_reason for o in outs if o.finish_reason is not None}
    assert finished == {"m": FinishReason.STOP, "i": FinishReason.LENGTH}
    assert sum(len(o.new_token_ids) for o in outs if o.request_id == "m") == 3


def test_preemption_when_blocks_run_out_loses_nothing():
    # 6 blocks of 4 tokens: two requests of 8-token prompts fit (2 blocks each) but cannot both grow to 12
    s = make_scheduler(num_blocks=5, block_size=4, budget=64)
    s.add_request(make_request("old", 8, max_tokens=8))
    s.add_request(make_request("new", 8, max_tokens=8))
    produced: dict[str, int] = {"old": 0, "new": 0}
    preempted_seen = False
    for _ in range(60):
        if not s.has_unfinished_requests():
            break
        _, outs = fake_run(s, token=5)
        for o in outs:
            produced[o.request_id] += len(o.new_token_ids)
        preempted_seen |= s.num_preempted_total > 0
    assert preempted_seen, "the test must actually preempt"
    assert produced == {"old": 8, "new": 8}
    assert s.kv.num_free_blocks == 5


def test_preempted_request_goes_to_head_and_worker_is_told():
    s = make_scheduler(num_blocks=4, block_size=4, budget=64)
    s.add_request(make_request("a", 8, max_tokens=8))
    s.add_request(make_request("b", 7, max_tokens=8))
    fake_run(s)  # both prefilled: 2 blocks each, pool empty
    out, _ = fake_run(s)  # a needs a 3rd block at 9 tokens -> b (newest) is preempted
    assert s.waiting[0].request_id == "b" and s.requests["b"].status == RequestStatus.PREEMPTED
    # the same step tells the worker to drop b's state; b is not scheduled
    assert "b" in out.finished_req_ids and "b" not in out.num_scheduled_tokens


def test_abort_frees_blocks_and_tells_worker():
    s = make_scheduler()
    s.add_request(make_request("a", 10))
    s.add_request(make_request("b", 10))
    fake_run(s)
    s.abort_requests(["a", "unknown"])
    out, _ = fake_run(s)
    assert "a" in out.finished_req_ids and "a" not in out.num_scheduled_tokens
    assert len(s.kv.req_blocks) == 1


def test_kv_cache_ratio_limits_admission():
    s = make_scheduler(num_blocks=10, block_size=4, ratio=0.5)
    s.add_request(make_request("a", 12))  # 3 blocks
    s.add_request(make_request("b", 12))  # would make 6 > 5
    out, _ = fake_run(s)
    assert list(out.num_scheduled_tokens) == ["a"]


def pipelined_run(sched: Scheduler, token_for, max_steps: int = 200) -> dict[str, list[int]]:
    """Drive the scheduler as the overlapped engine does: step t+1 is scheduled before step t's
    tokens are applied. token_for(rid, n_out) picks the sampled token."""
    produced: dict[str, list[int]] = {}
    pending = None
    for _ in range(max_steps):
        out = sched.schedule()
        launched = {rid: [token_for(rid, sched.requests[rid].num_output_tokens + sched.requests[rid].num_inflight - 1)]
                    for rid in out.num_scheduled_tokens if sched.requests[rid].num_inflight}
        if pending is not None:
            for o in sched.update_from_output(ModelRunnerOutput(list(pending), pending)):
                produced.setdefault(o.request_id, []).extend(o.new_token_ids)
        pending = launched or None
        if not sched.has_unfinished_requests() and pending is None:
            break
    return produced


def test_pipelined_steps_respect_max_tokens_exactly():
    s = make_scheduler()
    s.add_request(make_request("a", 5, max_tokens=7))
    s.add_request(make_request("b", 9, max_tokens=3))
    produced = pipelined_run(s, lambda rid, i: 5)
    assert {k: len(v) for k, v in produced.items()} == {"a": 7, "b": 3}
    assert s.kv.num_free_blocks == 64


def test_pipelined_stop_token_drops_the_wasted_step():
    s = make_scheduler()
    s.add_request(make_request("a", 5, max_tokens=20))
    # eos (0) as the 4th token: the step launched meanwhile produces a token nobody sees
    produced = pipelined_run(s, lambda rid, i: 0 if i == 3 else 5)
    assert produced == {"a": [5, 5, 5, 0]}
    assert not s.has_unfinished_requests() and s.kv.num_free_blocks == 64


def test_pipelined_preemption_with_tokens_in_flight_loses_nothing():
    s = make_scheduler(num_blocks=5, block_size=4, budget=64)
    s.add_request(make_request("old", 8, max_tokens=8))
    s.add_request(make_request("new", 8, max_tokens=8))
    produced = pipelined_run(s, lambda rid, i: 5)
    assert s.num_preempted_total > 0
    assert {k: len(v) for k, v in produced.items()} == {"old": 8, "new": 8}
    assert s.kv.num_free_blocks == 5


def test_request_longer_than_the_whole_cache_finishes_with_length():
    """Alone, it would preempt itself forever once the cache is full of its own blocks."""
    sched = make_scheduler(num_blocks=4)  # 16 tokens in all
    sched.add_request(make_request("a", 10, max_tokens=50))
    outputs = []
    for _ in range(40):
        if not sched.has_unfinished_requests():
            break
        outputs += fake_run(sched)[1]
    assert not sched.has_unfinished_requests()
    finished = [o for o in outputs if o.finish_reason is not None]
    assert finished[0].finish_reason == FinishReason.LENGTH
    assert sum(len(o.new_token_ids) for o in outputs) == 6  # 10 + 6 = 16 tokens = the cache
