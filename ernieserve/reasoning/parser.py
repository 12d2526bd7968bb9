"""Reasoning parsers: split a chat completion into ``reasoning_content`` and ``content``.

Models that think write ``<think> ... </think>`` around their reasoning; the chat template
usually opens the block itself (the prompt ends in ``<think>``) or, with thinking switched off,
writes an empty closed block (``<think>\\n\\n</think>\\n\\n``). So where the output starts is
read from the prompt's last think marker:

* an open ``<think>``: the output starts in reasoning;
* a ``</think>``: thinking is off, everything is content;
* no marker (raw prompts, templates without thinking): content, unless the output itself starts
  with ``<think>``.

In reasoning, everything up to the end marker is reasoning and everything after it content; the
markers themselves appear in neither. The split is made on token ids (``</think>`` is one
special token, invisible in text decoded with ``skip_special_tokens``), and turned into a character
position in the output text with the same decoding the detokenizer uses. Text is then assigned by
position, so text the detokenizer holds back (a stop-string prefix, half a character) still lands
on the right side when it is released. Non-streaming output is one `ReasoningStream.feed` of the
whole text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ernieserve.frontend.detokenizer import DecodeFn, _decode_fn, _prompt_context
from ernieserve.sampling_params import SamplingParams

# The template writes its think marker within the last few prompt tokens.
_PROMPT_TAIL_TOKENS = 32


class ThinkState(enum.Enum):
    REASONING = "reasoning"
    CONTENT = "content"
    UNDECIDED = "undecided"  # no marker in the prompt: the first output token decides


@dataclass(slots=True)
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """Splits at a start/end marker pair of single tokens (``<think>`` / ``</think>``)."""

    name: ClassVar[str] = ""
    start_token: ClassVar[str] = "<think>"
    end_token: ClassVar[str] = "</think>"
    # enable_thinking when the request leaves it unset (None: the chat template's own default)
    default_enable_thinking: ClassVar[bool | None] = None

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        missing = [t for t in (self.start_token, self.end_token) if t not in vocab]
        if missing:
            raise ValueError(f"--reasoning-parser {self.name}: the tokenizer has no {' or '.join(missing)} token, "
                             "so this model does not write reasoning blocks this parser can find.")
        self.start_id = int(vocab[self.start_token])
        self.end_id = int(vocab[self.end_token])

    def initial_state(self, prompt_token_ids: list[int]) -> ThinkState:
        for token in reversed(prompt_token_ids[-_PROMPT_TAIL_TOKENS:]):
            if token == self.end_id:
                return ThinkState.CONTENT
            if token == self.start_id:
                return ThinkState.REASONING
        return ThinkState.UNDECIDED

    def stream(self, prompt_token_ids: list[int], params: SamplingParams) -> "ReasoningStream":
        """State for one output (one choice) that is streamed delta by delta."""
        decode = _decode_fn(self.tokenizer, params)
        return ReasoningStream(self, self.initial_state(prompt_token_ids), decode,
                               _prompt_context(decode, prompt_token_ids))

    def split(self, prompt_token_ids: list[int], output_token_ids: list[int], text: str,
              params: SamplingParams) -> tuple[str | None, str]:
        """(reasoning_content, content) of a finished output; reasoning None when there was none."""
        stream = self.stream(prompt_token_ids, params)
        delta = stream.feed(text, output_token_ids)
        return (delta.reasoning if stream.had_reasoning else None), delta.content


@dataclass(slots=True)
class ReasoningStream:
    """Where reasoning and content lie in one output's text, learnt as its tokens arrive.

    Positions are character offsets into the whole output text: reasoning is
    ``[reasoning_from, reasoning_to)``, content ``[content_from, end)``; None = not known yet.
    """

    parser: ReasoningParser
    state: ThinkState
    decode: DecodeFn
    context: list[int]  # prompt tail the detokenizer decodes the output after
    ids: list[int] = field(default_factory=list)
    seen: int = 0  # characters of output text fed so far
    reasoning_from: int = 0
    reasoning_to: int | None = None
    content_from: int | None = None

    def __post_init__(self) -> None:
        if self.state is ThinkState.CONTENT:
            self.reasoning_to = self.content_from = 0

    @property
    def had_reasoning(self) -> bool:
        return self.reasoning_to != 0

    def feed(self, text: str, token_ids: list[int]) -> ReasoningDelta:
        """Split one delta (its text and its token ids) into reasoning and content."""
        first_new = len(self.ids)
        self.ids.extend(token_ids)
        if self.state is ThinkState.UNDECIDED and self.ids:
            if self.ids[0] == self.parser.start_id:
                self.state = ThinkState.REASONING
                self.reasoning_from = self._text_len(1)  # a visible "<think>" is not reasoning
                first_new = max(first_new, 1)
            else:
                self.state = ThinkState.CONTENT
                self.reasoning_to = self.content_from = 0
        if self.state is ThinkState.REASONING:
            try:
                end = self.ids.index(self.parser.end_id, first_new)
            except ValueError:
                end = -1
            if end >= 0:
                self.state = ThinkState.CONTENT
                self.reasoning_to = self._text_len(end)
                self.content_from = self._text_len(end + 1)
        start, self.seen = self.seen, self.seen + len(text)
        return ReasoningDelta(self._slice(text, start, self.reasoning_from, self.reasoning_to),
                              self._slice(text, start, self.content_from, None))

    def _text_len(self, num_tokens: int) -> int:
        """Characters of output text that the first ``num_tokens`` output tokens decode to."""
        return len(self.decode(self.context + self.ids[:num_tokens])) - len(self.decode(self.context))

    @staticmethod
    def _slice(text: str, start: int, lo: int | None, hi: int | None) -> str:
        """The part of ``text`` (which starts at ``start``) inside [lo, hi); nothing when lo is None."""
        if lo is None:
            return ""
        a = max(lo - start, 0)
        b = len(text) if hi is None else min(hi - start, len(text))
        return text[a:b] if b > a else ""


class Ernie45VLReasoningParser(ReasoningParser):
    name = "ernie-45-vl"
    default_enable_thinking = True  # FastDeploy: ERNIE-4.5-VL thinks unless enable_thinking is false


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
