"""EngineCore: the busy loop's body. `step()` = schedule -> execute -> update.

Token ids in, token ids out; it knows nothing about text. The offline `LLM` runs it in-process;
the API server runs it in its own process (engine/core_proc.py).
"""

from __future__ import annotations

import atexit
import gc
import logging
import time

from ernieserve.config import EngineConfig
from ernieserve.core.request import Request
from ernieserve.core.scheduler import Scheduler
from ernieserve.engine.protocol import EngineOutput, EngineOutputs, EngineRequest, FinishReason
from ernieserve.engine.step_stats import StepProfiler, StepStats, StepTimes, step_stats_enabled
from ernieserve.worker.executor import FatalHandler, make_executor
from ernieserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, on_fatal: FatalHandler | None = None) -> None:
        """on_fatal: called (from a monitor thread) when a tensor-parallel rank dies or fails."""
        start = time.perf_counter()
        self.config = config
        # rank 0 here; with --tensor-parallel-size > 1, ranks 1.. in worker processes
        self.executor = make_executor(config, on_fatal)
        try:
            num_blocks = self.executor.initialize_kv_cache()
        except BaseException:
            self.executor.shutdown()
            raise
        max_ctx = num_blocks * config.cache.block_size
        if max_ctx < config.scheduler.max_model_len:
            logger.warning("the KV cache holds %d tokens, less than max_model_len %d: one request "
                           "can use at most that many", max_ctx, config.scheduler.max_model_len)
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, self.executor.num_host_blocks)
        # Everything built so far lives as long as the engine: keep the collector from walking it
        # on every collection (long-tail step latencies otherwise).
        self.step_stats = StepStats() if step_stats_enabled() else None
        self._profiler = StepProfiler.from_env()
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)  # let interpreter shutdown finalize them (nanobind warns otherwise)
        logger.info("Engine ready in %.1f s: max_model_len %d, max_num_seqs %d, max_num_batched_tokens %d, "
                    "largest context the cache holds %d tokens", time.perf_counter() - start,
                    config.scheduler.max_model_len, config.scheduler.max_num_seqs,
                    config.scheduler.max_num_batched_tokens, max_ctx)

    def validate(self, req: EngineRequest) -> None:
        """Reject what would break the step loop; the front end checks the same, this is the guard."""
        n = len(req.prompt_token_ids)
        max_len = self.config.scheduler.max_model_len
        if n == 0:
            raise ValueError("The prompt is empty; it must contain at least one token.")
        if n >= max_len:
            raise ValueError(f"The prompt has {n} tokens, which leaves no room to generate within "
                             f"max_model_len ({max_len}).")
        if n > self.runner.num_blocks * self.config.cache.block_size:
            raise ValueError(f"The prompt has {n} tokens, more than the KV cache can hold "
                             f"({self.runner.num_blocks * self.config.cache.block_size}).")
        vocab = self.config.model.vocab_size
        if min(req.prompt_token_ids) < 0 or max(req.prompt_token_ids) >= vocab:
            raise ValueError(f"prompt_token_ids must be in [0, {vocab}).")

    def add_request(self, req: EngineRequest) -> None:
        self.validate(req)
        self.scheduler.add_request(Request.from_engine_request(req, self.config.scheduler.max_model_len))

    def abort_requests(self, request_ids: list[str]) -> list[EngineOutput]:
        aborted = self.scheduler.abort_requests(request_ids)
        return [EngineOutput(r.request_id, [], finish_reason=FinishReason.ABORT) for r in aborted]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self.executor.has_pending

    def step(self) -> EngineOutputs:
        """Schedule and launch step t, then apply step t-1's results while the device works."""
        if self.step_stats is not None or self._profiler is not None:
            return self._measured_step()
        sched = self.scheduler.schedule()
        out = self.executor.execute_model(sched)
        outputs = self.scheduler.update_from_output(out)
        return EngineOutputs(outputs=outputs, scheduler_stats=self.scheduler.stats(), timestamp=time.time())

    def _measured_step(self) -> EngineOutputs:
        """step(), timed segment by segment (engine/step_stats.py)."""
        if self._profiler is not None:
            self._profiler.before_step()
        times = StepTimes()
        self.runner.step_times = times
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        t1 = time.perf_counter()
        out = self.executor.execute_model(sched)
        t2 = time.perf_counter()
        outputs = self.scheduler.update_from_output(out)
        t3 = time.perf_counter()
        self.runner.step_times = None
        if self.step_stats is not None:
            self.step_stats.record(times, t1 - t0, t3 - t2, t3 - t0)
        if self._profiler is not None:
            self._profiler.after_step()
        return EngineOutputs(outputs=outputs, scheduler_stats=self.scheduler.stats(), timestamp=time.time())

    def stats(self):  # type: ignore[no-untyped-def]
        return self.scheduler.stats()

    @property
    def runner(self) -> ModelRunner:
        """Tensor-parallel rank 0's model runner (the only one with TP size 1)."""
        return self.executor.runner

    @property
    def num_blocks(self) -> int:
        return self.executor.num_blocks

    def model_param_bytes(self) -> int:
        """Weight bytes on one device."""
        return self.executor.model_param_bytes()

    def decode_weight_bytes(self) -> int:
        """Weight bytes a batch-1 decode step reads on one device (routed experts: the picked ones)."""
        return self.executor.decode_weight_bytes()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (no-op with one device)."""
        if self.step_stats is not None and self.step_stats.as_dict():
            logger.info("%s", self.step_stats.summary())
            self.step_stats.reset()
        self.executor.shutdown()
