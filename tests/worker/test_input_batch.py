"""Step inputs: the vectorised decode-only builder gives exactly what the general one gives."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ernieserve.sampling_params import SamplingParams
from ernieserve.worker import input_batch
from ernieserve.worker.input_batch import CachedRequestState, build_step_inputs


def _states(rng: random.Random, n: int, block_size: int) -> tuple[dict, dict[str, int]]:
    """n requests with one token scheduled each: decodes (some with their last token still in
    flight on the device), one-token prompts, and one-token chunks in the middle of a prompt."""
    states, inflight_rows = {}, {}
    next_block = 0
    for i in range(n):
        prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 300))]
        kind = rng.choice(["decode", "inflight", "chunk"])
        if kind == "chunk":
            tokens, computed, pending = list(prompt), rng.randrange(len(prompt)), 0
        else:
            out = [rng.randrange(1000) for _ in range(rng.randint(1, 50))]
            tokens, pending = prompt + out, int(kind == "inflight")
            computed = len(tokens) - 1 + pending  # the next input: the last known token, or the one in flight
        blocks = list(range(next_block, next_block + computed // block_size + 1))
        next_block += len(blocks) + rng.randrange(3)
        rid = f"r{i}"
        states[rid] = CachedRequestState(rid, prompt, tokens, SamplingParams(), blocks, computed, num_inflight=pending)
        if pending:
            inflight_rows[rid] = rng.randrange(n)
    return states, inflight_rows


@pytest.mark.parametrize("seed", range(5))
def test_decode_fast_path_equals_the_general_builder(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 16, 64])
    states, inflight_rows = _states(rng, rng.randint(1, 40), block_size)
    sched = {rid: 1 for rid in states}
    fast = build_step_inputs(states, sched, block_size, inflight_rows)
    counts = np.ones(len(sched), dtype=np.int64)
    qsl = np.arange(len(sched) + 1, dtype=np.int32)
    general = input_batch._build_any_step(states, list(sched), counts, qsl, block_size, inflight_rows)
    for field in ("req_ids", "sample_rows", "inflight_pos", "inflight_src"):
        assert getattr(fast, field) == getattr(general, field), field
    for field in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_table"):
        a, b = getattr(fast, field), getattr(general, field)
        assert a.dtype == b.dtype and np.array_equal(a, b), field
    assert fast.inflight_pos, "the case must include tokens still in flight"
