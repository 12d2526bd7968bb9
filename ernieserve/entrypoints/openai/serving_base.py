"""What chat and completions share: model-name check, request -> SamplingParams, length checks,
engine errors -> OpenAI errors, logprob formatting, usage, and SSE framing."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ernieserve.engine.async_client import AsyncLLM, EngineDeadError, RequestRejected
from ernieserve.entrypoints.openai.protocol import (OpenAIError, PromptTokensDetails, SamplingRequest, UsageInfo,
                                                    bad_request)
from ernieserve.outputs import Logprob
from ernieserve.reasoning.parser import ReasoningParser
from ernieserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# JSON has no -inf: a token the sampler could never pick gets this instead (as vLLM does).
_MIN_LOGPROB = -9999.0
_SAMPLING_FIELDS = frozenset(SamplingParams.__struct_fields__)


@dataclass(slots=True)
class ServingContext:
    engine: AsyncLLM
    served_model_names: list[str]
    model_path: str
    max_model_len: int
    chat_template: str | None = None
    reasoning_parser: ReasoningParser | None = None  # --reasoning-parser: reasoning_content in chat responses

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def resolve_model(self, name: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if not name:
            return self.served_model_names[0]
        if name in self.served_model_names:
            return name
        raise OpenAIError(404, f"The model `{name}` does not exist. This server serves: "
                          f"{', '.join(self.served_model_names)}.", "invalid_request_error", "model",
                          "model_not_found")

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, prompt_param: str) -> None:
        limit = self.max_model_len
        if num_prompt_tokens == 0:
            raise bad_request("The prompt is empty; it must contain at least one token.", prompt_param)
        if num_prompt_tokens >= limit:
            verb = "have" if prompt_param == "messages" else "has"
            raise bad_request(f"This model's maximum context length is {limit} tokens, but the {prompt_param} "
                              f"{verb} {num_prompt_tokens} tokens, which leaves no room for the completion. "
                              f"Reduce the length of the {prompt_param}.", prompt_param, "context_length_exceeded")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {prompt_param}, "
                              f"{max_tokens} in the completion). Reduce the length of the {prompt_param} or "
                              "max_tokens.", "max_tokens", "context_length_exceeded")

    def sampling_params(self, req: SamplingRequest, **fields: Any) -> SamplingParams:
        """The request's sampling fields that are set, over the model's generation_config defaults."""
        if req.logit_bias:
            raise bad_request("logit_bias is not supported yet.", "logit_bias")
        values = {name: getattr(req, name) for name in _SAMPLING_FIELDS & set(req.model_fields_set)}
        values = {k: v for k, v in values.items() if v is not None}
        # the caller's fields as given: max_tokens=None means "up to the context limit", not 16
        values.update(fields)
        try:
            return self.engine.processor.default_sampling_params(**values)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), _param_of(str(e))) from None


def _param_of(message: str) -> str | None:
    first = message.split(" ", 1)[0]
    return first if first in _SAMPLING_FIELDS else None


def engine_error(e: Exception) -> OpenAIError:
    """Map what AsyncLLM raises to the HTTP error the client sees."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, EngineDeadError):
        return OpenAIError(503, str(e), "server_error", None, "engine_dead")
    if isinstance(e, (RequestRejected, ValueError)):
        return bad_request(str(e))
    logger.exception("unexpected error while serving a request")
    return OpenAIError(500, f"Internal server error: {type(e).__name__}: {e}", "server_error")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def sse(payload: Any) -> str:
    """One server-sent event; `payload` is a response model or a plain dict."""
    text = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ---- logprobs ---------------------------------------------------------------------------------
def clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def token_text(tokenizer: Any, token_id: int, entry: Logprob | None) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id])


def top_entries(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens at one position, most likely first."""
    ranked = sorted(position.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30))
    return ranked[:k]


# ---- several request streams as one -------------------------------------------------------------
async def merge_streams(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the iterator's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[Any]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as e:  # handed to the consumer, which re-raises it
            await queue.put((i, e))
            return
        await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
