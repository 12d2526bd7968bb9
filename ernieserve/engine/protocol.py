"""Messages between the front end (API server or offline LLM) and the engine core.

The engine core sees token ids only. These structs cross the ZMQ socket as msgpack (msgspec),
and the in-process offline engine passes the same objects directly.
"""

from __future__ import annotations

import enum

import msgspec

from ernieserve.multimodal.inputs import MultiModalItem
from ernieserve.sampling_params import SamplingParams


class FinishReason(enum.IntEnum):
    STOP = 0  # eos, stop token id or stop string
    LENGTH = 1  # max_tokens or max_model_len
    ABORT = 2  # client went away or was aborted

    def __str__(self) -> str:
        return self.name.lower()


class EngineRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int] = []
    arrival_time: float = 0.0
    cache_salt: str | None = None
    # images / videos of the prompt, in prompt order (see multimodal/inputs.py); [] for text
    mm_items: list[MultiModalItem] = []


class LogprobsLists(msgspec.Struct, array_like=True):
    """Top logprobs of each position: row i holds the chosen token first, then the top-k.

    token_ids[i][0] is the sampled (or prompt) token, logprobs[i][0] its logprob, ranks[i] its
    rank in the vocabulary (1 = most likely).
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class EngineOutput(msgspec.Struct, omit_defaults=True, array_like=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: LogprobsLists | None = None
    prompt_logprobs: LogprobsLists | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_preempted_total: int = 0
    kv_cache_usage: float = 0.0  # fraction of GPU blocks in use
    num_total_blocks: int = 0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up, in all
    prefix_cache_hits: int = 0  # prompt tokens found, on the device or the host tier, in all
    prefix_cache_requests: int = 0  # requests looked up, in all
    prefix_cache_hit_requests: int = 0  # requests that found at least one cached block, in all
    num_cached_blocks: int = 0  # device blocks holding a cached (hashed) KV block
    # host tier of the prefix cache (--swap-space)
    prefix_cache_host_hits: int = 0  # prompt tokens found on the host tier (copied back), in all
    num_host_blocks: int = 0  # the tier's size; 0 when there is none
    num_host_cached_blocks: int = 0  # host blocks holding a cached KV block
    num_swapped_out_blocks_total: int = 0  # evicted device blocks copied to the host
    num_swapped_in_blocks_total: int = 0  # host blocks copied back to the device


class EngineOutputs(msgspec.Struct, omit_defaults=True):
    outputs: list[EngineOutput] = []
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = 0.0
    # request id -> wall time it was first scheduled; filled by the engine core process for the
    # front end's queue-time metric (the in-process engine leaves it empty)
    first_scheduled: dict[str, float] = {}


class AbortRequests(msgspec.Struct):
    request_ids: list[str]


class EngineError(msgspec.Struct):
    """Sent instead of outputs when the engine rejects a request (bad input that got through)."""

    request_id: str
    message: str


class EngineReady(msgspec.Struct):
    """The engine core process is up: what the front end needs to know about its capacity."""

    pid: int
    num_gpu_blocks: int
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int


class EngineDead(msgspec.Struct):
    """The engine core process failed, at startup (bad checkpoint, no memory) or in its loop."""

    message: str
    during_startup: bool
