"""The host tier's copies on a real GPU: stream ordering against in-flight steps, and end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

L, BS, H, D = 4, 64, 2, 128


def make(num_blocks: int = 64, num_host: int = 32, staging: int = 8):
    from ernieserve.worker.swap import KVSwapper

    cache = torch.randn(L, 2, num_blocks, BS, H, D, device="cuda", dtype=torch.bfloat16)
    host = torch.empty((num_host, L, 2, BS, H, D), dtype=torch.bfloat16, pin_memory=True)
    return KVSwapper(cache, host, staging)


def test_round_trip_through_pinned_host_memory():
    s = make()
    before = s.cache.clone()
    out = [(d, h) for h, d in enumerate([5, 9, 10, 11, 40, 3, 2, 1, 63, 0, 17, 18])]
    s.swap(out, [])
    s.before_forward()
    s.cache.zero_()  # on the compute stream, after the copies
    s.swap([], [(h, d) for d, h in out])
    s.before_forward()
    torch.cuda.synchronize()
    for d, _ in out:
        assert torch.equal(s.cache[:, :, d], before[:, :, d])


def test_swap_out_waits_for_the_step_in_flight_that_writes_the_block():
    s = make()
    s.step_launched(np.zeros((1, 1), dtype=np.int32))  # an older step
    torch.cuda._sleep(200_000_000)  # a long step t-1 ...
    s.cache[:, :, 7].fill_(3.0)  # ... whose last kernel writes block 7
    s.step_launched(np.array([[7, 8]], dtype=np.int32))
    s.swap([(7, 0)], [])  # evicted at step t: must see step t-1's write
    torch.cuda.synchronize()
    assert bool((s.host[0] == 3.0).all())


def test_forward_waits_for_swap_ins():
    s = make()
    s.host[4].fill_(5.0)
    s.step_launched(np.zeros((1, 1), dtype=np.int32))
    s.step_launched(np.zeros((1, 1), dtype=np.int32))
    s.swap([], [(4, 12)])
    s.before_forward()
    seen = s.cache[:, :, 12].float().sum()  # the "forward" reading the block
    torch.cuda.synchronize()
    assert seen.item() == 5.0 * s.cache[:, :, 12].numel()


@pytest.fixture(scope="module")
def ernie_03b(tmp_path_factory):
    from ernieserve.checkpoint.dummy import write_dummy_checkpoint

    return write_dummy_checkpoint("ernie-4.5-0.3b", tmp_path_factory.mktemp("e03b-swap"), dtype="bfloat16")


def test_host_hits_match_device_hits_bit_for_bit(ernie_03b):
    """The same traffic with a roomy device cache (the prefix stays on the device) and a tight one
    with a host tier (it comes back from the host): the same KV, so the same tokens."""
    from ernieserve import LLM, SamplingParams

    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(10, 100000, (n,), generator=gen).tolist()  # noqa: E731
    prefix = ids(2000)
    prompts = [prefix + ids(100)] + [ids(1500) for _ in range(4)] + [prefix + ids(100)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    results = []
    for kw in (dict(num_gpu_blocks_override=512), dict(num_gpu_blocks_override=40, swap_space=1.0)):
        llm = LLM(model=str(ernie_03b), dtype="bfloat16", max_model_len=2560, **kw)
        outs = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0] for p in prompts]
        results.append(([o.outputs[0].token_ids for o in outs], outs[-1].num_cached_tokens,
                        llm.llm_engine.core.scheduler.stats()))
        del llm
        torch.cuda.empty_cache()
    (roomy, roomy_cached, _), (tight, tight_cached, stats) = results
    assert tight == roomy and tight_cached == roomy_cached == 31 * 64
    assert stats.num_swapped_in_blocks_total == 31 and stats.prefix_cache_host_hits == 31 * 64
