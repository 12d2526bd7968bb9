"""Hypothesis state machine over the scheduler's block manager, both tiers of the prefix cache.

Hypothesis picks the sequence of operations (add a request that shares a prefix, step = allocate +
append + evict to the host + restore from it, abort = free) and shrinks any failure to a minimal
sequence. After every operation the invariants of `check_invariants` hold: a block's ref count
equals the number of requests holding it, free blocks are exactly the unreferenced ones, and every
cached block (device or host) holds the KV of its tokens, as the simulated worker wrote them.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ernieserve.config import CacheConfig, SchedulerConfig
from ernieserve.core.scheduler import Scheduler
from tests.core.test_prefix_cache import FakeWorker, check_invariants, req

BLOCK = 4
PREFIXES = [[(7 * i + j) % 50 + 1 for j in range(n)] for i, n in enumerate((4, 9, 16, 23))]


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(8, 24), num_host=st.integers(0, 16), budget=st.sampled_from([8, 16, 64]),
                seed=st.integers(0, 2**16))
    def setup(self, num_blocks: int, num_host: int, budget: int, seed: int) -> None:
        self.num_blocks = num_blocks
        self.sched = Scheduler(SchedulerConfig(6, budget, 64, True),
                               CacheConfig(BLOCK, 0.9, None, 1.0, 0.0, 1.0 if num_host else 0.0, True),
                               num_blocks, num_host_blocks=num_host)
        self.worker = FakeWorker(num_blocks, max(num_host, 1), BLOCK, random.Random(seed))
        self.added = 0

    @rule(prefix=st.integers(0, len(PREFIXES) - 1), suffix=st.lists(st.integers(1, 50), max_size=6),
          max_tokens=st.integers(1, 10), salted=st.booleans())
    def add_request(self, prefix: int, suffix: list[int], max_tokens: int, salted: bool) -> None:
        tokens = (PREFIXES[prefix] + suffix)[:40]
        self.sched.add_request(req(f"r{self.added}", tokens, "tenant" if salted else None, max_tokens=max_tokens))
        self.added += 1

    @precondition(lambda self: self.sched.has_unfinished_requests() or self.worker.pending)
    @rule(steps=st.integers(1, 8))
    def step(self, steps: int) -> None:
        for _ in range(steps):
            if not (self.sched.has_unfinished_requests() or self.worker.pending):
                break
            self.sched.update_from_output(self.worker.execute(self.sched.schedule()))
            check_invariants(self.sched, self.worker)

    @precondition(lambda self: bool(self.sched.requests))
    @rule(pick=st.integers(0, 1000))
    def abort(self, pick: int) -> None:
        ids = sorted(self.sched.requests)
        self.sched.abort_requests([ids[pick % len(ids)]])

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "sched"):
            check_invariants(self.sched, self.worker)

    def teardown(self) -> None:
        if not hasattr(self, "sched"):
            return
        while self.sched.has_unfinished_requests() or self.worker.pending:  # drain: nothing may leak
            self.sched.update_from_output(self.worker.execute(self.sched.schedule()))
            check_invariants(self.sched, self.worker)
        assert self.sched.kv.num_free_blocks == self.num_blocks and not self.sched.kv.req_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                                 suppress_health_check=[HealthCheck.too_slow], phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
TestBlockManager = BlockManagerMachine.TestCase
