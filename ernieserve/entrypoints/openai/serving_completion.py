"""POST /v1/completions: prompt(s) -> engine -> OpenAI text completions.

A request may carry several prompts; each is one engine request, and choice i*n + j is sample j
of prompt i, as in OpenAI's API.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ernieserve.entrypoints.openai.protocol import (CompletionChoice, CompletionChunk, CompletionLogprobs,
                                                    CompletionRequest, CompletionResponse, bad_request)
from ernieserve.entrypoints.openai.serving_base import (SSE_DONE, ServingContext, clamp, engine_error,
                                                        merge_streams, sse, token_text, top_entries, usage)
from ernieserve.frontend.output_processor import OutputKind
from ernieserve.outputs import Logprob, RequestOutput

_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclass(slots=True)
class PromptState:
    """One prompt of the request and what has been sent for each of its n choices."""

    request_id: str
    text: str
    token_ids: list[int]
    texts: list[str]
    ids: list[list[int]]
    offsets: list[int]  # text length so far per choice, for logprobs' text_offset
    finals: list[Any]
    logprobs: list[CompletionLogprobs]
    prompt_logprobs_sent: list[bool]
    cached_tokens: int = 0

    @classmethod
    def create(cls, request_id: str, text: str, token_ids: list[int], n: int) -> "PromptState":
        return cls(request_id, text, token_ids, [""] * n, [[] for _ in range(n)], [0] * n, [None] * n,
                   [CompletionLogprobs() for _ in range(n)], [False] * n)


@dataclass(slots=True)
class CompletionJob:
    request_id: str
    model: str
    request: CompletionRequest
    prompts: list[PromptState]
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def engine_request_ids(self) -> list[str]:
        return [p.request_id for p in self.prompts]


class OpenAIServingCompletion:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def start(self, req: CompletionRequest) -> CompletionJob:
        """Validate every prompt, then queue them all; raises OpenAIError (nothing is queued then)."""
        model = self.ctx.resolve_model(req.model)
        if req.suffix:
            raise bad_request("suffix is not supported yet.", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of is not supported yet; leave it unset or equal to n.", "best_of")
        prompts = [self._tokenize(p) for p in _prompt_list(req)]
        max_tokens = req.max_tokens if req.max_tokens is not None else _DEFAULT_MAX_TOKENS
        for _, ids in prompts:
            self.ctx.check_length(len(ids), max_tokens, "prompt")
        want_prompt_lps = req.echo and req.logprobs is not None
        params = self.ctx.sampling_params(req, max_tokens=max_tokens,
                                          prompt_logprobs=req.logprobs if want_prompt_lps else None)
        base = f"cmpl-{uuid.uuid4().hex}"
        job = CompletionJob(base, model, req, [])
        try:
            for i, (text, ids) in enumerate(prompts):
                rid = f"{base}-{i}"
                self.ctx.engine.add_request(rid, {"prompt": text, "prompt_token_ids": ids}, params, OutputKind.DELTA)
                job.prompts.append(PromptState.create(rid, text, ids, req.n))
        except Exception as e:
            for p in job.prompts:  # leave nothing half-queued behind a bad prompt
                self.ctx.engine.abort(p.request_id)
            raise engine_error(e) from None
        return job

    def _tokenize(self, prompt: str | list[int]) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.ctx.tokenizer.encode(prompt, add_special_tokens=True)
        return self.ctx.tokenizer.decode(prompt), list(prompt)

    # ---- non-streaming ----------------------------------------------------------------------
    async def full_response(self, job: CompletionJob) -> CompletionResponse:
        streams = [self.ctx.engine.stream_outputs(p.request_id) for p in job.prompts]
        try:
            async for i, ro in merge_streams(streams):
                self._accumulate(job, job.prompts[i], ro)
        except Exception as e:
            raise engine_error(e) from None
        choices = []
        for pi, p in enumerate(job.prompts):
            for j in range(job.request.n):
                final = p.finals[j]
                prefix = p.text if job.request.echo else ""
                choice = CompletionChoice(index=pi * job.request.n + j, text=prefix + p.texts[j],
                                          logprobs=p.logprobs[j] if job.request.logprobs is not None else None,
                                          finish_reason=final.finish_reason if final else None,
                                          stop_reason=final.stop_reason if final else None)
                if job.request.return_token_ids:
                    choice.prompt_token_ids, choice.completion_token_ids = p.token_ids, p.ids[j]
                choices.append(choice)
        return CompletionResponse(id=job.request_id, created=job.created, model=job.model, choices=choices,
                                  usage=self._usage(job))

    def _accumulate(self, job: CompletionJob, p: PromptState, ro: RequestOutput) -> None:
        p.cached_tokens = ro.num_cached_tokens
        for c in ro.outputs:
            if job.request.logprobs is not None:
                _extend(p.logprobs[c.index], self._choice_logprobs(job, p, ro, c))
            p.texts[c.index] += c.text
            p.ids[c.index].extend(c.token_ids)
            if c.finish_reason is not None:
                p.finals[c.index] = c

    def _choice_logprobs(self, job: CompletionJob, p: PromptState, ro: RequestOutput,
                         c: Any) -> CompletionLogprobs:
        """Logprobs of what is new for choice c: the echoed prompt first (once), then its tokens."""
        k = job.request.logprobs or 0
        out = CompletionLogprobs()
        j = c.index
        if job.request.echo and not p.prompt_logprobs_sent[j]:
            p.prompt_logprobs_sent[j] = True
            rows = ro.prompt_logprobs or [None] * len(p.token_ids)
            p.offsets[j] = self._append_logprobs(out, p.token_ids, rows, k, 0)
        if c.logprobs is not None:
            p.offsets[j] = self._append_logprobs(out, c.token_ids, c.logprobs, k, p.offsets[j])
        return out

    def _append_logprobs(self, out: CompletionLogprobs, token_ids: list[int],
                         rows: list[dict[int, Logprob] | None], k: int, offset: int) -> int:
        tok = self.ctx.tokenizer
        for token_id, row in zip(token_ids, rows):
            chosen = row.get(token_id) if row else None
            text = token_text(tok, token_id, chosen)
            out.tokens.append(text)
            out.text_offset.append(offset)
            out.token_logprobs.append(clamp(chosen.logprob) if chosen else None)
            if row is None:
                out.top_logprobs.append(None)
            else:
                top = {token_text(tok, tid, lp): clamp(lp.logprob) for tid, lp in top_entries(row, k)}
                top.setdefault(text, clamp(chosen.logprob) if chosen else clamp(float("-inf")))
                out.top_logprobs.append(top)
            offset += len(text)
        return offset

    # ---- streaming --------------------------------------------------------------------------
    async def stream(self, job: CompletionJob) -> AsyncIterator[str]:
        req = job.request
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(include_usage and opts and opts.continuous_usage_stats)
        streams = [self.ctx.engine.stream_outputs(p.request_id) for p in job.prompts]
        finished = {(pi, j): False for pi in range(len(job.prompts)) for j in range(req.n)}
        try:
            async for pi, ro in merge_streams(streams):
                p = job.prompts[pi]
                choices = self._stream_choices(job, pi, p, ro, finished)
                if choices:
                    yield sse(CompletionChunk(id=job.request_id, created=job.created, model=job.model,
                                              choices=choices, usage=self._usage(job) if continuous else None))
        except Exception as e:
            yield sse(engine_error(e).body())
            yield SSE_DONE
            return
        if include_usage:
            yield sse(CompletionChunk(id=job.request_id, created=job.created, model=job.model, choices=[],
                                      usage=self._usage(job)))
        yield SSE_DONE

    def _stream_choices(self, job: CompletionJob, pi: int, p: PromptState, ro: RequestOutput,
                        finished: dict[tuple[int, int], bool]) -> list[CompletionChoice]:
        req = job.request
        p.cached_tokens = ro.num_cached_tokens
        choices = []
        for c in ro.outputs:
            j = c.index
            first = not p.texts[j] and not p.ids[j] and not p.prompt_logprobs_sent[j]
            if finished[(pi, j)] or not (c.text or c.token_ids or c.finish_reason or (first and req.echo)):
                continue  # DELTA outputs list every sample, also those with nothing new
            lps = self._choice_logprobs(job, p, ro, c) if req.logprobs is not None else None
            text = (p.text if req.echo and first else "") + c.text
            if req.echo:
                p.prompt_logprobs_sent[j] = True
            p.texts[j] += c.text
            p.ids[j].extend(c.token_ids)
            finished[(pi, j)] = c.finish_reason is not None
            choice = CompletionChoice(index=pi * req.n + j, text=text, logprobs=lps, finish_reason=c.finish_reason,
                                      stop_reason=c.stop_reason)
            if req.return_token_ids:
                choice.completion_token_ids = list(c.token_ids)
                if first:
                    choice.prompt_token_ids = p.token_ids
            choices.append(choice)
        return choices

    def _usage(self, job: CompletionJob) -> Any:
        prompt = sum(len(p.token_ids) for p in job.prompts)
        completion = sum(len(ids) for p in job.prompts for ids in p.ids)
        return usage(prompt, completion, sum(p.cached_tokens for p in job.prompts))


def _prompt_list(req: CompletionRequest) -> list[str | list[int]]:
    """OpenAI's four prompt shapes (and FastDeploy's prompt_token_ids) as a list of prompts."""
    if req.prompt_token_ids is not None:
        return [list(req.prompt_token_ids)]
    prompt = req.prompt
    if prompt is None:
        raise bad_request("prompt is required (or prompt_token_ids).", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty.", "prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]  # one prompt of token ids
    return list(prompt)


def _extend(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.text_offset.extend(more.text_offset)
    into.token_logprobs.extend(more.token_logprobs)
    into.tokens.extend(more.tokens)
    into.top_logprobs.extend(more.top_logprobs)
