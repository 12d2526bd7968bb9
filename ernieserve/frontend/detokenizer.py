"""Incremental detokenization with stop strings, for streaming and for final outputs.

The engine core hands back token ids a few at a time; this turns them into text as the user
should see it:

- Text is what ``tokenizer.decode(prompt + generated)`` adds after ``decode(prompt)``: the first
  generated token is decoded as a continuation (SentencePiece's leading "▁" stays a space), and a
  character whose UTF-8 bytes span several byte-level tokens appears once, when complete.
- Stop strings are found in the new text plus ``len(stop) - 1`` characters before it, so each
  update costs O(new text), never a re-scan of the whole output.
- Streaming deltas never show text that the final output will not contain: an incomplete
  character is held until its last byte arrives, and a tail that may still grow into a stop
  string is held until it either does (and is cut) or cannot any more.

Decoding slides a short window of ids (the prefix/read-offset technique) over the Rust
tokenizer's ``decode`` (or ``tokenizer.decode`` for a slow, remote-code SentencePiece tokenizer).
``tokenizers.decoders.DecodeStream`` does the same in Rust but only emits when the whole window
ends on a complete character, has no way to flush a truncated last character, and re-emits its
context when that ends mid-character; see ``_DecodeWindow``. ``clean_up_tokenization_spaces`` is
not applied: it rewrites text across chunk boundaries (" ." -> "."), and transformers itself
skips it for BPE vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ernieserve.sampling_params import SamplingParams

# What a lossy UTF-8 decode puts where a character's bytes are cut off.
_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decoding context: enough for the decoders' look-back (a leading-space
# strip on the first token, a character split over up to 4 byte tokens).
_PROMPT_CONTEXT_TOKENS = 4
# The decode window slides once it is longer than this (at a character boundary): each decode
# costs O(window), each slide one extra decode.
_MAX_WINDOW_TOKENS = 4

DecodeFn = Callable[[list[int]], str]


@dataclass(slots=True)
class _DecodeWindow:
    """The prefix/read-offset technique: decode a short window of recent ids, emit the new part.

    The window starts at a character boundary and holds the tokens since the previous one, so
    the decoder sees the context it needs (SentencePiece's leading-space strip applies to the
    window's first token both times, and cancels out). Complete characters are emitted even
    while the window ends inside a character: byte-level vocabularies merge the end of one CJK
    character with the start of the next, and waiting for a clean end (as ``DecodeStream`` does)
    delays text, and stop detection, by several tokens.
    """

    decode: DecodeFn
    ids: list[int]
    read: int  # ids[:read] decode to complete text: where the window may slide to
    emitted: int  # characters of decode(ids) already handed out

    @classmethod
    def after(cls, decode: DecodeFn, context: list[int]) -> _DecodeWindow:
        return cls(decode, list(context), len(context), len(decode(context)))

    def step(self, token_id: int) -> str:
        """Text completed by this token ("" while it only adds part of a character)."""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        complete = (
            len(text.rstrip(_REPLACEMENT_CHAR)) if text.endswith(_REPLACEMENT_CHAR) else len(text)
        )
        new_text = text[self.emitted : complete]
        self.emitted = max(self.emitted, complete)
        if new_text and complete == len(text):
            # A boundary: slide now and then (each slide costs one more decode), keeping the
            # tokens since the previous boundary as context. Only a token that added text makes
            # one, so the window never starts with nothing but skipped special tokens before a
            # SentencePiece "▁word" (which, decoded first, would lose its space).
            if len(self.ids) > _MAX_WINDOW_TOKENS and self.read > 0:
                self.ids = self.ids[self.read :]
                self.emitted = len(self.decode(self.ids))
            self.read = len(self.ids)
        return new_text

    def flush(self) -> str:
        """What is held back: an incomplete last character, shown as U+FFFD like decode() does."""
        text = self.decode(self.ids)
        tail = text[self.emitted :]
        self.emitted = len(text)
        return tail


def _decode_fn(tokenizer: PreTrainedTokenizerBase, params: SamplingParams) -> DecodeFn:
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        # The Rust tokenizer directly: transformers' decode adds Python overhead per call.
        backend: Tokenizer = tokenizer.backend_tokenizer
        skip = params.skip_special_tokens
        return lambda ids: backend.decode(ids, skip_special_tokens=skip)

    def decode_slow(ids: list[int]) -> str:
        return tokenizer.decode(
            ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    return decode_slow


def _prompt_context(decode: DecodeFn, prompt_token_ids: list[int]) -> list[int]:
    """The last few prompt tokens, enough to decode the first generated token as a continuation."""
    n = min(len(prompt_token_ids), _PROMPT_CONTEXT_TOKENS)
    context = prompt_token_ids[len(prompt_token_ids) - n :]
    # A prompt ending in skipped special tokens (a chat template's role markers) decodes to "";
    # reach back to real text, or SentencePiece would strip the first generated token's space.
    while decode(context) == "" and n < len(prompt_token_ids):
        n = min(2 * n, len(prompt_token_ids))
        context = prompt_token_ids[len(prompt_token_ids) - n :]
    # Nor start inside a character: ByteFallback decodes a run of <0xXX> tokens as a whole, and
    # leading stray bytes would turn every generated byte-token character of the run into U+FFFD.
    extra = 0
    while decode(context).startswith(_REPLACEMENT_CHAR) and n < len(prompt_token_ids) and extra < 8:
        n, extra = n + 1, extra + 1
        context = prompt_token_ids[len(prompt_token_ids) - n :]
    # A prompt given as ids may end inside a character: the window must start at a boundary, so
    # drop those bytes (a continuation that completes the character then shows U+FFFD).
    while context and decode(context).endswith(_REPLACEMENT_CHAR):
        context = context[:-1]
    return context


class IncrementalDetokenizer:
    """Generated token ids -> output text of one request, with stop strings applied.

    Call ``update`` with each step's new ids; it says when a stop string has appeared. Read the
    final text from ``output_text`` after ``flush()`` (``get_delta_text(finished=True)`` flushes
    too): a last token that ends mid-character only shows up, as U+FFFD, in the flush.
    ``token_ids`` gets every id passed in, also after a stop or with ``detokenize=False``, when
    nothing is decoded and ``update`` always returns None.
    """

    __slots__ = (
        "token_ids",
        "stop_token_count",
        "_params",
        "_window",
        "_stops",
        "_max_stop_len",
        "_chunks",
        "_length",
        "_tail",
        "_emitted",
        "_stop",
        "_flushed",
    )

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> None:
        self.token_ids: list[int] = []
        # Generated tokens up to and including the one that completed the stop string; the ones
        # after it add no text (callers may drop their logprobs).
        self.stop_token_count: int | None = None
        self._params = params
        self._stops: list[str] = list(params.stop or [])
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        # Output text as appended pieces: joining on every step would cost O(output) per token.
        self._chunks: list[str] = []
        self._length = 0
        self._tail = ""  # the last _max_stop_len - 1 characters, all that stop matching needs
        self._emitted = 0  # characters already returned by get_delta_text
        self._stop: str | None = None
        self._flushed = False
        self._window: _DecodeWindow | None = None
        if params.detokenize:
            decode = _decode_fn(tokenizer, params)
            self._window = _DecodeWindow.after(decode, _prompt_context(decode, prompt_token_ids))

    @property
    def output_text(self) -> str:
        """Everything decoded so far, cut at the stop string once one appears."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the request, if one did."""
        return self._stop

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append generated tokens; return the stop string if one has now appeared, else None.

        After a stop, output_text ends just before the stop string (just after it with
        include_stop_str_in_output) and later tokens add no text. With several stop strings the
        one completed first wins (see _find_stop). Work is O(new tokens + longest stop).
        """
        first_new = len(self.token_ids)
        self.token_ids.extend(new_token_ids)
        if self._window is None or self._stop is not None or self._flushed:
            return None
        pieces: list[str] = []
        # (generated tokens so far, characters of new text so far) after each emitting token.
        marks: list[tuple[int, int]] = []
        new_len = 0
        for i, token_id in enumerate(new_token_ids):
            piece = self._window.step(token_id)
            if piece:
                pieces.append(piece)
                new_len += len(piece)
                marks.append((first_new + i + 1, new_len))
        if not pieces:
            return None
        return self._append("".join(pieces), marks)

    def flush(self) -> None:
        """End of generation: add what the stream still holds (an incomplete last character)."""
        if self._flushed:
            return
        self._flushed = True
        if self._window is None or self._stop is not None:
            return
        tail = self._window.flush()
        if tail:
            self._append(tail, [(len(self.token_ids), len(tail))])

    def get_delta_text(self, finished: bool) -> str:
        """Text new since the last call, for streaming.

        While not finished this holds back the longest tail that could still grow into a stop
        string (a stop is cut from the output, so text shown early could not be taken back).
        With include_stop_str_in_output nothing is held: text up to and including the stop stays.
        An incomplete character never reaches the text before it is complete, or before the
        flush that finishing does.
        """
        if finished:
            self.flush()
        end = self._length
        if not finished and self._stop is None and not self._params.include_stop_str_in_output:
            end -= self._stop_prefix_len()
        if end <= self._emitted:
            return ""
        delta = self._text_since(self._emitted)[: end - self._emitted]
        self._emitted = end
        return delta

    # -- text and stop strings ---------------------------------------------------------------

    def _append(self, new_text: str, marks: list[tuple[int, int]]) -> str | None:
        old_length = self._length
        self._chunks.append(new_text)
        self._length += len(new_text)
        if not self._stops:
            return None
        window = self._tail + new_text
        found = self._find_stop(window, len(self._tail))
        if found is None:
            self._tail = window[max(0, len(window) - (self._max_stop_len - 1)) :]
            return None
        stop, start_in_window = found
        end_in_window = start_in_window + len(stop)
        cut_in_window = (
            end_in_window if self._params.include_stop_str_in_output else start_in_window
        )
        window_origin = old_length - len(self._tail)
        self._truncate(window_origin + cut_in_window)
        end_in_new = end_in_window - len(self._tail)
        self.stop_token_count = next(tokens for tokens, chars in marks if chars >= end_in_new)
        self._stop = stop
        return stop

    def _find_stop(self, window: str, new_from: int) -> tuple[str, int] | None:
        """The stop string that completes first in ``window`` (new text starts at ``new_from``).

        "First" is the one that ends earliest, ties going to the longer: the same answer as if
        the text had arrived one character at a time, so the cut does not depend on how the
        tokenizer happened to split it. Earlier text holds no complete stop, so each stop is
        looked for only where it would end inside the new text.
        """
        best: tuple[str, int] | None = None
        best_end = len(window) + 1
        for stop in self._stops:
            start = window.find(stop, max(0, new_from - (len(stop) - 1)))
            if start < 0:
                continue
            end = start + len(stop)
            if end < best_end or (
                end == best_end and best is not None and len(stop) > len(best[0])
            ):
                best, best_end = (stop, start), end
        return best

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        held = 0
        for stop in self._stops:
            tail = self._tail[max(0, len(self._tail) - (len(stop) - 1)) :]
            # The earliest match of the stop's first character gives the longest candidate.
            i = tail.find(stop[0])
            while i >= 0 and len(tail) - i > held:
                if stop.startswith(tail[i:]):
                    held = len(tail) - i
                    break
                i = tail.find(stop[0], i + 1)
        return held

    def _text_since(self, start: int) -> str:
        """output_text[start:], from only the chunks that hold it (streaming needs the last few)."""
        parts: list[str] = []
        pos = self._length
        for chunk in reversed(self._chunks):
            if pos <= start:
                break
            parts.append(chunk)
            pos -= len(chunk)
        return "".join(reversed(parts))[start - pos :]

    def _truncate(self, length: int) -> None:
        while self._chunks and self._length - len(self._chunks[-1]) >= length:
            self._length -= len(self._chunks.pop())
        if self._length > length:
            self._chunks[-1] = self._chunks[-1][: len(self._chunks[-1]) - (self._length - length)]
            self._length = length


@dataclass(slots=True)
class LogprobTokenDecoder:
    """The text of single tokens as OpenAI logprobs show them.

    A token's text is what it adds after ordinary text: it is decoded behind a fixed anchor and
    the anchor's text dropped, so SentencePiece's "▁world" reads " world" (alone it would lose
    the space, being first) and byte-level "Ġworld" too. A token holding part of a character
    reads as U+FFFD; special tokens read as themselves. Build one per tokenizer and keep it.
    """

    tokenizer: PreTrainedTokenizerBase
    _anchor: list[int] = field(init=False)
    _anchor_len: int = field(init=False)

    def __post_init__(self) -> None:
        anchor = self.tokenizer.encode("a", add_special_tokens=False)
        anchor_text = self._decode_raw(anchor)
        if not anchor_text or _REPLACEMENT_CHAR in anchor_text:
            anchor, anchor_text = [], ""
        self._anchor = anchor
        self._anchor_len = len(anchor_text)

    def decode(self, token_id: int) -> str:
        return self._decode_raw([*self._anchor, token_id])[self._anchor_len :]

    def decode_many(self, token_ids: list[int]) -> list[str]:
        if isinstance(self.tokenizer, PreTrainedTokenizerFast):
            texts = self.tokenizer.backend_tokenizer.decode_batch(
                [[*self._anchor, t] for t in token_ids], skip_special_tokens=False
            )
            return [text[self._anchor_len :] for text in texts]
        return [self.decode(t) for t in token_ids]

    def _decode_raw(self, ids: list[int]) -> str:
        if isinstance(self.tokenizer, PreTrainedTokenizerFast):
            return self.tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )


def decode_token_for_logprobs(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """One token's text as logprobs show it; see LogprobTokenDecoder (keep one for hot paths)."""
    return LogprobTokenDecoder(tokenizer).decode(token_id)
