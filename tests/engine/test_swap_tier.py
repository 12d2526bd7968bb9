"""The prefix cache's host tier (--swap-space) end to end on CPU: a shared prefix evicted from the
device by other traffic is copied back from the host instead of recomputed, and every output is
the same as with prefix caching off."""

from __future__ import annotations

import pytest
import torch

from ernieserve import LLM, SamplingParams
from ernieserve.config import ConfigError, EngineArgs
from ernieserve.engine.protocol import SchedulerStats

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
BS = 16


def make_llm(path, **kw) -> LLM:
    args = dict(model=str(path), device="cpu", max_model_len=256, block_size=BS, num_gpu_blocks_override=16,
                max_num_seqs=8)
    return LLM(**(args | kw))


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_one_by_one(llm: LLM, prompts: list[list[int]], params: SamplingParams = PARAMS):
    return [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0] for p in prompts]


def stats(llm: LLM) -> SchedulerStats:
    return llm.llm_engine.core.scheduler.stats()


def test_prefix_evicted_from_the_device_comes_back_from_the_host(tiny_ernie):
    prefix = random_ids(6 * BS, 1)  # six full blocks
    # the prefix, then traffic that needs every device block twice over, then the prefix again
    prompts = [prefix + random_ids(4, 2), random_ids(200, 3), random_ids(200, 4), prefix + random_ids(5, 5)]
    llm = make_llm(tiny_ernie, swap_space=0.01)
    assert llm.llm_engine.core.runner.num_host_blocks > 16
    outs = run_one_by_one(llm, prompts)
    plain = run_one_by_one(make_llm(tiny_ernie, enable_prefix_caching=False), prompts)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    assert outs[-1].num_cached_tokens == 6 * BS
    s = stats(llm)
    assert s.num_swapped_out_blocks_total >= 6 and s.num_swapped_in_blocks_total == 6
    assert s.prefix_cache_host_hits == 6 * BS and s.prefix_cache_hits == 6 * BS
    assert s.num_host_blocks == llm.llm_engine.core.runner.num_host_blocks and s.num_host_cached_blocks > 0


def test_without_the_host_tier_the_prefix_is_recomputed(tiny_ernie):
    prefix = random_ids(6 * BS, 1)
    prompts = [prefix + random_ids(4, 2), random_ids(200, 3), random_ids(200, 4), prefix + random_ids(5, 5)]
    outs = run_one_by_one(make_llm(tiny_ernie), prompts)
    assert outs[-1].num_cached_tokens == 0


def test_batched_shared_prefix_with_n_and_chunked_prefill(tiny_ernie):
    """Shared prompts in one batch, n > 1, and chunks of 24 tokens, through a tight device cache."""
    prefix = random_ids(3 * BS, 7)
    batch = [{"prompt_token_ids": prefix + random_ids(int(n), 10 + i)} for i, n in enumerate([3, 20, 40, 9, 30])]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=2)
    kw = dict(max_num_batched_tokens=24, num_gpu_blocks_override=12)
    llm = make_llm(tiny_ernie, swap_space=0.01, **kw)
    got = [llm.generate(batch, params, use_tqdm=False) for _ in range(2)]  # the second round hits the cache
    want = make_llm(tiny_ernie, enable_prefix_caching=False, **kw).generate(batch, params, use_tqdm=False)
    for round_ in got:
        assert [[c.token_ids for c in o.outputs] for o in round_] == [[c.token_ids for c in o.outputs] for o in want]
    assert stats(llm).num_swapped_in_blocks_total > 0


def test_preempted_requests_resume_from_the_host_tier(tiny_ernie):
    """A cache too small for the batch: requests are preempted, their cached blocks evicted to the
    host and copied back when they are readmitted; outputs as in a roomy cache."""
    batch = [{"prompt_token_ids": random_ids(int(n), 20 + i)} for i, n in enumerate([40, 70, 33, 90, 50, 64])]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tight = make_llm(tiny_ernie, swap_space=0.01, num_gpu_blocks_override=10, max_num_batched_tokens=32)
    got = tight.generate(batch, params, use_tqdm=False)
    want = make_llm(tiny_ernie, num_gpu_blocks_override=64).generate(batch, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    s = stats(tight)
    assert s.num_preempted_total > 0 and s.num_swapped_in_blocks_total > 0


def test_swap_space_must_be_a_size():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--swap-space"):
            EngineArgs(swap_space=bad).create_engine_config()
