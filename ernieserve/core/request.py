"""A request's life inside the engine core: token ids, progress, status. No torch here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ernieserve.engine.protocol import EngineRequest, FinishReason, LogprobsLists
from ernieserve.multimodal.inputs import MultiModalItem
from ernieserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    def finish_reason(self) -> FinishReason | None:
        return {RequestStatus.FINISHED_STOPPED: FinishReason.STOP, RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
                RequestStatus.FINISHED_ABORTED: FinishReason.ABORT}.get(self)


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float
    max_tokens: int  # resolved: never past max_model_len
    cache_salt: str | None = None
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose KV is in the cache or being computed by a launched step
    num_inflight: int = 0  # sampled tokens of launched steps whose ids the host does not know yet
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    stop_reason: int | str | None = None
    prompt_logprobs: LogprobsLists | None = None
    mm_items: list[MultiModalItem] = field(default_factory=list)  # images/videos, in prompt order

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @classmethod
    def from_engine_request(cls, req: EngineRequest, max_model_len: int) -> "Request":
        prompt_len = len(req.prompt_token_ids)
        limit = max_model_len - prompt_len
        max_tokens = limit if req.sampling_params.max_tokens is None else min(req.sampling_params.max_tokens, limit)
        return cls(request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
                   sampling_params=req.sampling_params, eos_token_ids=list(req.eos_token_ids),
                   arrival_time=req.arrival_time, max_tokens=max_tokens, cache_salt=req.cache_salt,
                   mm_items=list(req.mm_items))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def num_tokens_with_inflight(self) -> int:
        return len(self.all_token_ids) + self.num_inflight

    def reached_length_limit(self, max_model_len: int) -> bool:
        """True when the tokens already in flight take it to max_tokens or max_model_len."""
        return (self.num_output_tokens + self.num_inflight >= self.max_tokens
                or self.num_tokens_with_inflight >= max_model_len)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """After a new token: decide whether the request is finished, set status and stop_reason."""
        params = self.sampling_params
        last = self.all_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if params.stop_token_ids and last in params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
