"""POST /v1/chat/completions: messages -> chat template -> engine -> OpenAI chat responses.

Image and video content parts (VL models) are fetched and processed in worker threads, so a slow
URL or a large image never stalls other requests' streams; their placeholder tokens count in
``usage.prompt_tokens``. With ``--reasoning-parser`` each choice's output is split into
``reasoning_content`` and ``content`` (streamed as ``delta.reasoning_content`` then ``delta.content``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ernieserve.entrypoints.openai.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                                    ChatCompletionResponse, ChatLogprobs, ChatMessage,
                                                    ChatStreamChoice, ChatTokenLogprob, DeltaMessage, TopLogprob,
                                                    bad_request)
from ernieserve.entrypoints.openai.serving_base import (SSE_DONE, ServingContext, clamp, engine_error, sse,
                                                        token_text, top_entries, usage)
from ernieserve.frontend.output_processor import OutputKind
from ernieserve.multimodal.chat import ChatContentError, parse_chat_messages
from ernieserve.multimodal.inputs import MultiModalItem
from ernieserve.outputs import CompletionOutput, RequestOutput
from ernieserve.reasoning.parser import ReasoningStream


@dataclass(slots=True)
class ChatJob:
    """A validated chat request queued in the engine."""

    request_id: str
    model: str
    request: ChatCompletionRequest
    prompt_token_ids: list[int]
    created: int = field(default_factory=lambda: int(time.time()))
    params: Any = None  # the SamplingParams sent (the reasoning parser decodes as the detokenizer does)


class OpenAIServingChat:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def start(self, req: ChatCompletionRequest) -> ChatJob:
        """Validate and queue the request; raises OpenAIError (nothing is queued then)."""
        model = self.ctx.resolve_model(req.model)
        _refuse_unsupported(req)
        text, ids, mm_items = await self._prompt(req, model)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        self.ctx.check_length(len(ids), max_tokens, "messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
        top = req.top_logprobs or 0
        if not 0 <= top <= 20:
            raise bad_request(f"top_logprobs must be in [0, 20], got {top}.", "top_logprobs")
        params = self.ctx.sampling_params(req, max_tokens=max_tokens, logprobs=top if req.logprobs else None)
        job = ChatJob(f"chatcmpl-{uuid.uuid4().hex}", model, req, ids, params=params)
        prompt: dict[str, Any] = {"prompt": text, "prompt_token_ids": ids}
        if mm_items is not None:
            prompt["mm_items"] = mm_items
        try:
            self.ctx.engine.add_request(job.request_id, prompt, params, OutputKind.DELTA)
        except Exception as e:
            raise engine_error(e) from None
        return job

    async def _prompt(self, req: ChatCompletionRequest,
                      model: str) -> tuple[str | None, list[int], list[MultiModalItem] | None]:
        """Text, token ids (image/video runs expanded) and, for media, the processed items."""
        if req.prompt_token_ids is not None:
            return None, list(req.prompt_token_ids), None
        tokenizer = self.ctx.tokenizer
        processor = self.ctx.engine.processor
        try:
            messages, media = parse_chat_messages(req.messages, takes_media=processor.mm_processor is not None,
                                                  model=model)
        except ChatContentError as e:
            raise bad_request(str(e), e.param) from None
        if req.disable_chat_template:
            if media:
                raise bad_request("disable_chat_template cannot carry images or videos: their placeholders come "
                                  "from the chat template.", "disable_chat_template")
            # FastDeploy: the raw text, no template; special tokens as for a plain completion
            text = "".join(m["content"] or "" for m in messages)
            return text, tokenizer.encode(text, add_special_tokens=True), None
        kwargs = dict(req.chat_template_kwargs or {})
        if req.enable_thinking is not None:
            kwargs.setdefault("enable_thinking", req.enable_thinking)
        parser = self.ctx.reasoning_parser
        if parser is not None and parser.default_enable_thinking is not None:
            kwargs.setdefault("enable_thinking", parser.default_enable_thinking)
        try:
            text = processor.apply_chat_template(
                messages, req.chat_template or self.ctx.chat_template, req.add_generation_prompt, **kwargs)
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        # the template already holds the special tokens: do not add BOS again
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not media:
            return text, ids, None
        try:
            processor.check_media_counts(len(media.images), len(media.videos))  # before fetching anything
            images, videos = await asyncio.to_thread(processor.load_chat_media, media)
            ids, items = await asyncio.to_thread(processor.mm_processor.process, ids, images, videos)
        except ValueError as e:  # MediaError, limits, placeholders that do not match the media
            raise bad_request(str(e), "messages") from None
        return text, ids, items

    # ---- non-streaming ----------------------------------------------------------------------
    async def full_response(self, job: ChatJob) -> ChatCompletionResponse:
        n = job.request.n
        texts, ids = [""] * n, [[] for _ in range(n)]
        logprobs: list[list[ChatTokenLogprob]] = [[] for _ in range(n)]
        finals: list[CompletionOutput | None] = [None] * n
        cached = 0
        try:
            async for ro in self.ctx.engine.stream_outputs(job.request_id):
                cached = ro.num_cached_tokens
                for c in ro.outputs:
                    texts[c.index] += c.text
                    ids[c.index].extend(c.token_ids)
                    logprobs[c.index].extend(self._logprobs(job, c))
                    if c.finish_reason is not None:
                        finals[c.index] = c
        except Exception as e:
            raise engine_error(e) from None
        choices = []
        parser = self.ctx.reasoning_parser
        for i in range(n):
            final = finals[i]
            message = ChatMessage(content=texts[i])
            if parser is not None:
                message.reasoning_content, message.content = parser.split(job.prompt_token_ids, ids[i], texts[i],
                                                                          job.params)
            if job.request.return_token_ids:
                message.prompt_token_ids, message.completion_token_ids = job.prompt_token_ids, ids[i]
            choices.append(ChatChoice(index=i, message=message,
                                      logprobs=ChatLogprobs(content=logprobs[i]) if job.request.logprobs else None,
                                      finish_reason=final.finish_reason if final else None,
                                      stop_reason=final.stop_reason if final else None))
        return ChatCompletionResponse(id=job.request_id, created=job.created, model=job.model, choices=choices,
                                      usage=usage(len(job.prompt_token_ids), sum(map(len, ids)), cached))

    # ---- streaming --------------------------------------------------------------------------
    async def stream(self, job: ChatJob) -> AsyncIterator[str]:
        req = job.request
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(include_usage and opts and opts.continuous_usage_stats)
        num_prompt = len(job.prompt_token_ids)
        completion_tokens = 0
        cached = 0
        finished = [False] * req.n
        parser = self.ctx.reasoning_parser
        reasoning = ([parser.stream(job.prompt_token_ids, job.params) for _ in range(req.n)]
                     if parser is not None else None)
        for i in range(req.n):
            delta = DeltaMessage(role="assistant", content="")
            if req.return_token_ids:
                delta.prompt_token_ids = job.prompt_token_ids
            yield sse(self._chunk(job, [ChatStreamChoice(index=i, delta=delta)]))
        try:
            async for ro in self.ctx.engine.stream_outputs(job.request_id):
                cached = ro.num_cached_tokens
                choices = self._stream_choices(job, ro, finished, reasoning)
                completion_tokens += sum(len(c.token_ids) for c in ro.outputs)
                if choices:
                    chunk_usage = usage(num_prompt, completion_tokens, cached) if continuous else None
                    yield sse(self._chunk(job, choices, chunk_usage))
        except Exception as e:
            yield sse(engine_error(e).body())
            yield SSE_DONE
            return
        if include_usage:
            yield sse(self._chunk(job, [], usage(num_prompt, completion_tokens, cached)))
        yield SSE_DONE

    def _stream_choices(self, job: ChatJob, ro: RequestOutput, finished: list[bool],
                        reasoning: list[ReasoningStream] | None) -> list[ChatStreamChoice]:
        choices = []
        for c in ro.outputs:
            if finished[c.index] or not (c.text or c.token_ids or c.finish_reason):
                continue  # DELTA outputs list every sample, also those with nothing new
            delta = DeltaMessage(content=c.text)
            if reasoning is not None:
                split = reasoning[c.index].feed(c.text, list(c.token_ids))
                # reasoning deltas until the end marker, content deltas after it; the marker in neither
                delta.reasoning_content = split.reasoning or None
                delta.content = split.content if split.content or not split.reasoning else None
            if job.request.return_token_ids:
                delta.completion_token_ids = list(c.token_ids)
            lps = ChatLogprobs(content=self._logprobs(job, c)) if job.request.logprobs else None
            finished[c.index] = c.finish_reason is not None
            choices.append(ChatStreamChoice(index=c.index, delta=delta, logprobs=lps, finish_reason=c.finish_reason,
                                            stop_reason=c.stop_reason))
        return choices

    def _chunk(self, job: ChatJob, choices: list[ChatStreamChoice], chunk_usage: Any = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=job.request_id, created=job.created, model=job.model, choices=choices,
                                   usage=chunk_usage)

    def _logprobs(self, job: ChatJob, c: CompletionOutput) -> list[ChatTokenLogprob]:
        if not job.request.logprobs or c.logprobs is None:
            return []
        tok = self.ctx.tokenizer
        k = job.request.top_logprobs or 0
        out = []
        for token_id, position in zip(c.token_ids, c.logprobs):
            chosen = position.get(token_id)
            text = token_text(tok, token_id, chosen)
            top = [TopLogprob(token=(t := token_text(tok, tid, lp)), logprob=clamp(lp.logprob),
                              bytes=list(t.encode("utf-8")))
                   for tid, lp in top_entries(position, k)]
            out.append(ChatTokenLogprob(token=text, logprob=clamp(chosen.logprob if chosen else float("-inf")),
                                        bytes=list(text.encode("utf-8")), top_logprobs=top))
        return out


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise bad_request("tools (function calling) are not supported yet.", "tools")
    if req.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice is not supported yet (tools are not).", "tool_choice")
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise bad_request(f"response_format {fmt!r} is not supported yet (structured output is planned).",
                          "response_format")
