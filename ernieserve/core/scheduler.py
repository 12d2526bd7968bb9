"""One token-budget scheduler for prefill, decode and chunked prefill alike.

Each step gives every scheduled request some number of new tokens: the rest of its known tokens
(a whole or partial prompt, or 1 for decode) within `max_num_batched_tokens` and `max_num_seqs`.
Running requests are served first, in arrival order; then waiting ones are admitted while budget,
sequence slots and blocks last.

Steps overlap: step t is scheduled and launched before step t-1's sampled tokens reach the host
(the worker feeds them in). So a request's progress counts tokens "in flight": scheduling advances
`num_computed_tokens` at once, a step that will sample adds one to `num_inflight`, and the update
for that step resolves it. A request that turns out to have stopped at t-1 had its step-t work
wasted; its output is dropped. Length limits are known ahead, so they waste nothing. When blocks run out, the newest running request is preempted: its
blocks are freed and it goes back to the head of the waiting queue, to be recomputed later. No
request is ever dropped. Its full blocks stay in the prefix cache when freed (and move to the host
tier, `--swap-space`, if the device evicts them), so on readmission only what was lost to both
tiers and its last partial block are recomputed.

Prefix-cache hits found in the host tier are copied back to fresh device blocks: the step's block
copies (`swap_out`, `swap_in`) travel with its `SchedulerOutput`, and the worker does them before
the step's forward pass.

The worker gets diffs: a request's full state once (`NewRequestData`), then only its new block ids
and progress (`CachedRequestData`); the worker appends the tokens it sampled itself.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from ernieserve.config import CacheConfig, SchedulerConfig
from ernieserve.core.kv_cache_manager import BlockCopies, KVCacheManager
from ernieserve.core.request import Request, RequestStatus
from ernieserve.engine.protocol import EngineOutput, LogprobsLists, SchedulerStats
from ernieserve.multimodal.inputs import MultiModalItem
from ernieserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class NewRequestData:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when resuming after preemption
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: list[int]
    mm_items: list[MultiModalItem] = field(default_factory=list)


@dataclass(slots=True)
class CachedRequestData:
    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    # request id -> tokens this step; dict order is the batch order
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # requests the worker must forget (finished, aborted or preempted) before this step
    finished_req_ids: set[str]
    # KV block copies to do before this step's forward pass, all swap-outs first:
    # (device block, host block) evicted cached blocks to keep in the host tier (--swap-space),
    # (host block, device block) prefix hits in the host tier to bring back
    swap_out: BlockCopies = field(default_factory=list)
    swap_in: BlockCopies = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class ModelRunnerOutput:
    req_ids: list[str]  # batch order
    # request id -> sampled token ids this step (empty for a partial prefill chunk)
    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 num_host_blocks: int = 0) -> None:
        self.config = config
        self.cache_config = cache_config
        self.kv = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching,
                                 num_host_blocks)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()  # to tell the worker at the next schedule()
        self._partial_prefills: list[Request] = []  # scheduled a prompt chunk that samples nothing
        self.num_preempted_total = 0
        # Admission stops when blocks in use would exceed this, keeping the rest for decode growth
        # (FastDeploy's --kv-cache-ratio).
        self._admit_block_limit = max(1, int(num_blocks * cache_config.kv_cache_ratio))

    # ---- requests in and out -------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        # A request can never hold more tokens than the whole cache: one that would grow past it
        # alone would preempt itself forever. It finishes with "length" there instead (the engine
        # warns at startup when the cache holds less than max_model_len).
        capacity = self.kv.pool.num_blocks * self.kv.block_size
        req.max_tokens = max(1, min(req.max_tokens, capacity - req.num_prompt_tokens))
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.status.finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            aborted.append(req)
        return aborted

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv.free(req)
        self._finished_ids.add(req.request_id)
        del self.requests[req.request_id]

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._cache_partial_prefills()
        budget = self.config.max_num_batched_tokens
        num_tokens: dict[str, int] = {}
        cached: list[CachedRequestData] = []
        new: list[NewRequestData] = []
        preempted = False

        i = 0
        max_len = self.config.max_model_len
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens_with_inflight - req.num_computed_tokens, budget)
            if n <= 0 or req.reached_length_limit(max_len):
                i += 1  # nothing to compute, or its last token is already in flight
                continue
            new_blocks = self.kv.allocate_slots(req, n)
            while new_blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                new_blocks = self.kv.allocate_slots(req, n)
            if new_blocks is None:  # req itself was preempted
                break
            num_tokens[req.request_id] = n
            budget -= n
            cached.append(CachedRequestData(req.request_id, new_blocks, req.num_computed_tokens))
            self._advance(req, n)
            i += 1

        # Admit waiting requests, unless blocks were just short (admitting would thrash).
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_inflight:  # preempted while a token was in flight: wait for it
                break
            hits = self.kv.find_cached_prefix(req)  # on the device, or on the host (copied back)
            req.num_computed_tokens = len(hits) * self.kv.block_size
            n = req.num_tokens - req.num_computed_tokens
            if n > budget and not self.config.enable_chunked_prefill:
                req.num_computed_tokens = 0
                break
            n = min(n, budget)
            in_use_after = self.kv.num_blocks_in_use() + self.kv.blocks_needed(req, n, hits)
            block_ids = None
            if in_use_after <= self._admit_block_limit or not self.running:
                block_ids = self.kv.allocate_slots(req, n, hits)
            if block_ids is None:
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.kv.record_lookup(req, hits)
            if req.num_preemptions == 0:
                req.num_cached_tokens = req.num_computed_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num_tokens[req.request_id] = n
            budget -= n
            new.append(NewRequestData(req.request_id, list(req.prompt_token_ids), req.output_token_ids,
                                      req.sampling_params, block_ids, req.num_computed_tokens,
                                      req.eos_token_ids, req.mm_items))
            self._advance(req, n)

        finished = self._finished_ids
        self._finished_ids = set()
        swap_out, swap_in = self.kv.take_swaps()
        return SchedulerOutput(new, cached, num_tokens, sum(num_tokens.values()), finished, swap_out, swap_in)

    def _advance(self, req: Request, n: int) -> None:
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens_with_inflight:
            req.num_inflight += 1  # this step samples the next token
        elif self.kv.enable_caching:
            self._partial_prefills.append(req)

    def _cache_partial_prefills(self) -> None:
        """Register the blocks filled by the last step's prompt chunks that sample nothing (blocks
        of sampling requests are registered with their tokens, in update_from_output). Done a step
        later, like those, so a hit is only ever read by a later step than the one writing it;
        then a request preempted in the middle of its prompt keeps what it computed."""
        for req in self._partial_prefills:
            if req.status == RequestStatus.RUNNING:
                self.kv.cache_full_blocks(req)
        self._partial_prefills.clear()

    def _preempt(self, req: Request) -> None:
        """Free a running request's blocks and put it at the head of the queue, to recompute later."""
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.prompt_logprobs = None  # recomputed from the start with the prompt
        req.num_preemptions += 1
        self.num_preempted_total += 1
        self.waiting.appendleft(req)
        self._finished_ids.add(req.request_id)  # the worker drops its state; it comes back as new
        logger.debug("preempted %s (%d tokens)", req.request_id, req.num_tokens)

    # ---- results ------------------------------------------------------------------------------
    def update_from_output(self, out: ModelRunnerOutput) -> list[EngineOutput]:
        """Apply one finished step's sampled tokens; stop checks happen here."""
        outputs: list[EngineOutput] = []
        max_len = self.config.max_model_len
        for rid, prompt_lp in out.prompt_logprobs.items():
            req = self.requests.get(rid)
            if req is not None and req.status == RequestStatus.RUNNING:
                req.prompt_logprobs = _concat_logprobs(req.prompt_logprobs, prompt_lp)
        for rid, new_ids in out.sampled_token_ids.items():
            req = self.requests.get(rid)
            if req is None:
                continue  # finished (stopped or aborted) after this step was launched
            req.num_inflight -= len(new_ids)
            stopped = False
            for tok in new_ids:
                req.append_output_token(tok)
                if req.check_stop(max_len):
                    stopped = True
                    break
            if req.status == RequestStatus.RUNNING or stopped:
                self.kv.cache_full_blocks(req)
            first = req.num_output_tokens == len(new_ids)
            outputs.append(EngineOutput(
                request_id=rid, new_token_ids=new_ids, new_logprobs=out.logprobs.get(rid),
                prompt_logprobs=req.prompt_logprobs if first else None,
                finish_reason=req.status.finish_reason() if stopped else None,
                stop_reason=req.stop_reason, num_cached_tokens=req.num_cached_tokens))
            if stopped:
                if req in self.running:
                    self.running.remove(req)
                else:
                    self.waiting.remove(req)  # preempted while its last token was in flight
                self._finish(req, req.status)
        return outputs

    def stats(self) -> SchedulerStats:
        total = self.kv.pool.num_blocks
        return SchedulerStats(num_running_reqs=len(self.running), num_waiting_reqs=len(self.waiting),
                              num_preempted_total=self.num_preempted_total, kv_cache_usage=self.kv.usage,
                              num_total_blocks=total, num_free_blocks=self.kv.num_free_blocks,
                              prefix_cache_queries=self.kv.queries, prefix_cache_hits=self.kv.hits,
                              prefix_cache_requests=self.kv.query_requests,
                              prefix_cache_hit_requests=self.kv.hit_requests,
                              num_cached_blocks=self.kv.pool.num_cached_blocks,
                              prefix_cache_host_hits=self.kv.host_hits, num_host_blocks=self.kv.num_host_blocks,
                              num_host_cached_blocks=self.kv.num_host_cached_blocks,
                              num_swapped_out_blocks_total=self.kv.num_swapped_out,
                              num_swapped_in_blocks_total=self.kv.num_swapped_in)


def _concat_logprobs(a: LogprobsLists | None, b: LogprobsLists) -> LogprobsLists:
    if a is None:
        return b
    return LogprobsLists(a.token_ids + b.token_ids, a.logprobs + b.logprobs, a.ranks + b.ranks)
