"""Turns EngineOutputs into RequestOutputs: detokenize, stop strings, logprobs, n > 1.

A request with n > 1 is sent to the engine as n child requests ("{id}-{i}"); their results are
gathered here under the parent id. A stop string found while detokenizing finishes the request
here and tells the caller to abort it in the engine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ernieserve.engine.protocol import EngineOutput, LogprobsLists
from ernieserve.frontend.detokenizer import IncrementalDetokenizer, LogprobTokenDecoder
from ernieserve.outputs import CompletionOutput, Logprob, RequestOutput
from ernieserve.sampling_params import SamplingParams


class OutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every RequestOutput carries all text so far
    DELTA = 1  # only what is new since the last one (streaming)
    FINAL_ONLY = 2  # one RequestOutput when the request finishes (offline generate)


def child_request_id(parent_id: str, index: int) -> str:
    return f"{index}-{parent_id}"


@dataclass(slots=True)
class ChildState:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0  # for DELTA
    sent_logprobs: int = 0


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    kind: OutputKind
    children: dict[str, ChildState]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    num_unfinished: int = 0  # children still generating

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_decoder = LogprobTokenDecoder(tokenizer)
        self.requests: dict[str, RequestState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, kind: OutputKind, child_ids: list[str], arrival_time: float = 0.0) -> None:
        children = {}
        for i, cid in enumerate(child_ids):
            children[cid] = ChildState(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
                                       logprobs=[] if params.logprobs is not None else None,
                                       cumulative_logprob=0.0 if params.logprobs is not None else None)
            self.child_to_parent[cid] = request_id
        self.requests[request_id] = RequestState(request_id, prompt, prompt_token_ids, params, kind, children,
                                                 arrival_time=arrival_time, num_unfinished=len(children))

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a parent request; returns its child ids still to abort in the engine."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        for cid in state.children:
            self.child_to_parent.pop(cid, None)
        return [cid for cid, c in state.children.items() if c.finish_reason is None]

    def process_outputs(self, outputs: list[EngineOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns (outputs to hand to callers, child ids to abort in the engine)."""
        touched: dict[str, RequestState] = {}
        to_abort: list[str] = []
        for out in outputs:
            parent_id = self.child_to_parent.get(out.request_id)
            if parent_id is None:
                continue  # aborted by the caller meanwhile
            state = self.requests[parent_id]
            child = state.children[out.request_id]
            if self._update_child(state, child, out):
                to_abort.append(out.request_id)
            touched[parent_id] = state
        # One RequestOutput per parent, made after all its children's outputs are applied: a
        # DELTA output consumes every child's new text, so making one per child output would
        # drop the earlier children's deltas when a later one replaced it.
        results: list[RequestOutput] = []
        for parent_id, state in touched.items():
            ro = self._make_output(state)
            if ro is not None:
                results.append(ro)
            if state.finished:
                self.abort_request(parent_id)
        return results, to_abort

    def _update_child(self, state: RequestState, child: ChildState, out: EngineOutput) -> bool:
        """Apply one engine output; True if a stop string finished it here (abort in engine)."""
        if child.finish_reason is not None:
            return False  # outputs still in flight after a stop string ended the child here
        if out.prompt_logprobs is not None and state.params.prompt_logprobs is not None:
            state.prompt_logprobs = [None] + self._convert_logprobs(out.prompt_logprobs)
        state.num_cached_tokens = out.num_cached_tokens
        child.token_ids.extend(out.new_token_ids)
        if child.logprobs is not None and out.new_logprobs is not None:
            converted = self._convert_logprobs(out.new_logprobs)
            child.logprobs.extend(converted)
            for tok, pos in zip(out.new_token_ids, converted):
                child.cumulative_logprob += pos[tok].logprob
        # Offline final-only requests without stop strings need the text only at the end: decode
        # once then, instead of every step (the per-step cost that dominates large batches).
        defer = state.kind == OutputKind.FINAL_ONLY and not state.params.stop
        stop_str = None if defer else child.detok.update(out.new_token_ids)
        if defer and out.finish_reason is not None:
            child.detok.update(child.token_ids)
        if stop_str is not None:
            child.finish_reason, child.stop_reason = "stop", stop_str
            state.num_unfinished -= 1
            return out.finish_reason is None
        if out.finish_reason is not None:
            child.finish_reason = str(out.finish_reason)
            child.stop_reason = out.stop_reason
            child.detok.flush()  # a character cut off by max_tokens still reaches the final text
            state.num_unfinished -= 1
        return False

    def _convert_logprobs(self, lp: LogprobsLists) -> list[dict[int, Logprob]]:
        rows = []
        for ids, lps, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            row: dict[int, Logprob] = {}
            texts = self.token_decoder.decode_many(ids)
            for j, (tok, val) in enumerate(zip(ids, lps)):
                if tok in row:
                    continue
                row[tok] = Logprob(val, rank if j == 0 else j, texts[j])
            rows.append(row)
        return rows

    def _make_output(self, state: RequestState) -> RequestOutput | None:
        if state.kind == OutputKind.FINAL_ONLY and not state.finished:
            return None
        completions = [self._completion(state, c) for c in sorted(state.children.values(), key=lambda c: c.index)]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, state.prompt_logprobs,
                             completions, state.finished, state.num_cached_tokens)

    def _completion(self, state: RequestState, c: ChildState) -> CompletionOutput:
        finished = c.finish_reason is not None
        if state.kind == OutputKind.DELTA:
            text = c.detok.get_delta_text(finished)
            ids = c.token_ids[c.sent_tokens:]
            lps = c.logprobs[c.sent_logprobs:] if c.logprobs is not None else None
            c.sent_tokens, c.sent_logprobs = len(c.token_ids), len(c.logprobs or ())
        else:
            text, ids, lps = c.detok.output_text, list(c.token_ids), c.logprobs
        return CompletionOutput(c.index, text, ids, c.cumulative_logprob, lps, c.finish_reason, c.stop_reason)
