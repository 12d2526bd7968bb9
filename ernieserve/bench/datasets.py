"""Prompt generators shared by `bench serve` and `bench throughput`.

Three datasets, named as in vLLM's `bench serve`:

- ``random``: prompts of random tokens drawn from the tokenizer's vocabulary (special and added
  tokens excluded), optionally behind one shared random prefix (``--random-prefix-len``).
- ``prefix-repetition``: ``num_prefixes`` random prefixes, each reused by an equal share of the
  prompts, each prompt a prefix plus its own random suffix (exercises prefix caching).
- ``sharegpt``: the first human turn of each conversation in a local ShareGPT JSON file, with the
  reply's token count as the requested output length.

Two modes. Text mode (``bench serve``) decodes the sampled ids to text and re-encodes it, trimming
or extending the ids until the text's token count (``add_special_tokens=False``) is as close to the
target as a few rounds allow: a server retokenizes the text, and byte-level merges or partial UTF-8
characters would otherwise change the count. Token mode (``bench throughput``/``latency``) skips
text and hands exact id lists to the engine.

A shared prefix is shared exactly as text. Token ids can differ only at the prefix's last token,
where a merge with the suffix's first characters is possible.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import numpy as np

# Rounds of decode -> re-encode -> trim/extend before settling for the closest length.
_MAX_FIT_ROUNDS = 10
# ShareGPT filters: the lengths vLLM users are used to seeing in these runs.
_SHAREGPT_MIN_LEN = 4
_SHAREGPT_MAX_PROMPT_LEN = 1024
_SHAREGPT_MAX_TOTAL_LEN = 2048


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer that the generators use."""

    all_special_ids: list[int]

    def __len__(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], **kwargs: Any) -> str: ...

    def batch_decode(self, sequences: list[list[int]], **kwargs: Any) -> list[str]: ...


class DatasetName(str, Enum):
    RANDOM = "random"
    SHAREGPT = "sharegpt"
    PREFIX_REPETITION = "prefix-repetition"


@dataclass(slots=True)
class SampleRequest:
    prompt: str  # empty in token mode
    prompt_len: int  # tokens, counted with the benchmark's tokenizer
    expected_output_len: int
    prompt_token_ids: list[int] | None = None  # set in token mode


@dataclass(frozen=True, slots=True)
class DatasetConfig:
    name: DatasetName = DatasetName.RANDOM
    num_prompts: int = 1000
    seed: int = 0
    dataset_path: str | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_prefix_len: int = 0
    prefix_repetition_prefix_len: int = 256
    prefix_repetition_suffix_len: int = 256
    prefix_repetition_num_prefixes: int = 10
    prefix_repetition_output_len: int = 128
    sharegpt_output_len: int | None = None

    @staticmethod
    def from_args(args: argparse.Namespace) -> "DatasetConfig":
        return DatasetConfig(
            name=DatasetName(args.dataset_name),
            num_prompts=args.num_prompts,
            seed=args.seed,
            dataset_path=args.dataset_path,
            random_input_len=args.random_input_len,
            random_output_len=args.random_output_len,
            random_range_ratio=args.random_range_ratio,
            random_prefix_len=args.random_prefix_len,
            prefix_repetition_prefix_len=args.prefix_repetition_prefix_len,
            prefix_repetition_suffix_len=args.prefix_repetition_suffix_len,
            prefix_repetition_num_prefixes=args.prefix_repetition_num_prefixes,
            prefix_repetition_output_len=args.prefix_repetition_output_len,
            sharegpt_output_len=args.sharegpt_output_len,
        )


def add_dataset_args(parser: argparse.ArgumentParser, default_num_prompts: int = 1000) -> None:
    """The dataset flags, with vLLM's names and defaults."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset-name", choices=[d.value for d in DatasetName], default="random")
    group.add_argument("--dataset-path", default=None, help="local ShareGPT JSON file")
    group.add_argument("--num-prompts", type=int, default=default_num_prompts)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--random-input-len", type=int, default=1024)
    group.add_argument("--random-output-len", type=int, default=128)
    group.add_argument(
        "--random-range-ratio", type=float, default=0.0,
        help="lengths uniform in [L*(1-r), L*(1+r)]; 0 <= r < 1",
    )
    group.add_argument(
        "--random-prefix-len", type=int, default=0,
        help="tokens of one random prefix put in front of every random prompt",
    )
    group.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    group.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    group.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    group.add_argument("--prefix-repetition-output-len", type=int, default=128)
    group.add_argument(
        "--sharegpt-output-len", type=int, default=None,
        help="output length for every ShareGPT request instead of the reply's length",
    )


def sample_requests(
    config: DatasetConfig, tokenizer: Tokenizer, token_mode: bool = False
) -> list[SampleRequest]:
    """Build ``config.num_prompts`` requests of the configured dataset."""
    rng = np.random.default_rng(config.seed)
    if config.name is DatasetName.RANDOM:
        return random_requests(
            tokenizer, rng, config.num_prompts, config.random_input_len,
            config.random_output_len, config.random_range_ratio, config.random_prefix_len,
            token_mode,
        )
    if config.name is DatasetName.PREFIX_REPETITION:
        return prefix_repetition_requests(
            tokenizer, rng, config.num_prompts, config.prefix_repetition_prefix_len,
            config.prefix_repetition_suffix_len, config.prefix_repetition_num_prefixes,
            config.prefix_repetition_output_len, token_mode,
        )
    if config.dataset_path is None:
        raise ValueError("--dataset-name sharegpt needs --dataset-path (a local ShareGPT JSON file)")
    return sharegpt_requests(
        tokenizer, rng, config.dataset_path, config.num_prompts, config.sharegpt_output_len,
        token_mode,
    )


# --------------------------------------------------------------------------------------------
# random and prefix-repetition


def sampleable_token_ids(tokenizer: Tokenizer, text_safe: bool = False) -> np.ndarray:
    """Ids of ordinary vocabulary entries: no special tokens, no added tokens.

    ``text_safe`` also drops ids that alone decode to nothing or to U+FFFD (byte-fallback pieces,
    partial UTF-8 sequences of byte-level BPE): text built from them re-encodes to about one
    token per id, which is what lets the length fitting converge in a round or two.
    """
    excluded = set(tokenizer.all_special_ids)
    get_added_vocab = getattr(tokenizer, "get_added_vocab", None)
    if get_added_vocab is not None:
        excluded.update(get_added_vocab().values())
    allowed = np.setdiff1d(np.arange(len(tokenizer)), np.fromiter(excluded, dtype=np.int64))
    if allowed.size == 0:
        raise ValueError("the tokenizer has no ordinary tokens to sample prompts from")
    if not text_safe:
        return allowed
    pieces = tokenizer.batch_decode([[int(i)] for i in allowed])
    safe = np.array([i for i, piece in zip(allowed.tolist(), pieces)
                     if piece and "\ufffd" not in piece], dtype=np.int64)
    return safe if safe.size else allowed


def sample_lengths(rng: np.random.Generator, length: int, range_ratio: float, n: int,
                   minimum: int) -> list[int]:
    """``n`` integers uniform in [floor(L*(1-r)), ceil(L*(1+r))], never below ``minimum``."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(minimum, math.floor(length * (1.0 - range_ratio)))
    high = max(low, math.ceil(length * (1.0 + range_ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


def random_requests(
    tokenizer: Tokenizer, rng: np.random.Generator, num_prompts: int, input_len: int,
    output_len: int, range_ratio: float = 0.0, prefix_len: int = 0, token_mode: bool = False,
) -> list[SampleRequest]:
    """Random prompts of ``prefix_len`` + U[input_len*(1±r)] tokens asking for U[output_len*(1±r)]."""
    allowed = sampleable_token_ids(tokenizer, text_safe=not token_mode)
    input_lens = sample_lengths(rng, input_len, range_ratio, num_prompts, minimum=1)
    output_lens = sample_lengths(rng, output_len, range_ratio, num_prompts, minimum=1)
    prefix = _make_prefix(tokenizer, rng, allowed, prefix_len, token_mode)
    return [
        _make_request(tokenizer, rng, allowed, prefix, n_in, n_out, token_mode)
        for n_in, n_out in zip(input_lens, output_lens)
    ]


def prefix_repetition_requests(
    tokenizer: Tokenizer, rng: np.random.Generator, num_prompts: int, prefix_len: int,
    suffix_len: int, num_prefixes: int, output_len: int, token_mode: bool = False,
) -> list[SampleRequest]:
    """Prompt i uses prefix i % num_prefixes, then the order is shuffled."""
    if num_prefixes < 1:
        raise ValueError(f"--prefix-repetition-num-prefixes must be at least 1, got {num_prefixes}")
    allowed = sampleable_token_ids(tokenizer, text_safe=not token_mode)
    prefixes = [_make_prefix(tokenizer, rng, allowed, prefix_len, token_mode)
                for _ in range(num_prefixes)]
    requests = [
        _make_request(tokenizer, rng, allowed, prefixes[i % num_prefixes], suffix_len,
                      output_len, token_mode)
        for i in range(num_prompts)
    ]
    return [requests[i] for i in rng.permutation(num_prompts)]


@dataclass(slots=True)
class _Prefix:
    text: str
    token_ids: list[int]


def _make_prefix(tokenizer: Tokenizer, rng: np.random.Generator, allowed: np.ndarray,
                 prefix_len: int, token_mode: bool) -> _Prefix:
    if prefix_len <= 0:
        return _Prefix("", [])
    ids = rng.choice(allowed, size=prefix_len).tolist()
    if token_mode:
        return _Prefix("", ids)
    text, token_ids = _fit_text(tokenizer, rng, allowed, "", ids, prefix_len)
    return _Prefix(text, token_ids)


def _make_request(tokenizer: Tokenizer, rng: np.random.Generator, allowed: np.ndarray,
                  prefix: _Prefix, input_len: int, output_len: int,
                  token_mode: bool) -> SampleRequest:
    ids = rng.choice(allowed, size=input_len).tolist()
    if token_mode:
        full = prefix.token_ids + ids
        return SampleRequest("", len(full), output_len, full)
    target = len(prefix.token_ids) + input_len
    text, token_ids = _fit_text(tokenizer, rng, allowed, prefix.text, ids, target)
    return SampleRequest(text, len(token_ids), output_len)


def _fit_text(tokenizer: Tokenizer, rng: np.random.Generator, allowed: np.ndarray,
              prefix_text: str, ids: list[int], target: int) -> tuple[str, list[int]]:
    """Text = prefix_text + decode(ids), with ``ids`` trimmed/extended toward ``target`` tokens.

    Each round continues from the text's own tokenization (its re-encoded ids past the prefix),
    not from ``ids``: a vocabulary entry may re-encode to several tokens (a BPE word that no
    merge builds comes back as its letters, so one id can be 3 tokens), and trimming ``ids`` by
    the token surplus would then cut far too much, down to an empty prompt. The tokenizer's own
    tokens re-encode to themselves up to merges at the cut, so a round or two lands on target.

    Returns the closest text found and its re-encoded ids.
    """
    num_prefix = len(tokenizer.encode(prefix_text, add_special_tokens=False)) if prefix_text else 0
    best_text, best_ids = "", []
    best_err = math.inf
    for _ in range(_MAX_FIT_ROUNDS):
        text = prefix_text + tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        diff = len(encoded) - target
        if abs(diff) < best_err:
            best_text, best_ids, best_err = text, encoded, abs(diff)
        if diff == 0 or (diff > 0 and not ids):
            break
        own_ids = encoded[num_prefix:]
        if diff > 0:
            ids = own_ids[: max(len(own_ids) - diff, 0)]
        else:
            ids = own_ids + rng.choice(allowed, size=-diff).tolist()
    return best_text, best_ids


# --------------------------------------------------------------------------------------------
# ShareGPT


def sharegpt_requests(
    tokenizer: Tokenizer, rng: np.random.Generator, path: str, num_prompts: int,
    fixed_output_len: int | None = None, token_mode: bool = False,
) -> list[SampleRequest]:
    """First human turn as prompt; the reply's token count (or ``fixed_output_len``) as output."""
    with open(path, encoding="utf-8") as f:
        entries: list[dict[str, Any]] = json.load(f)
    pairs = [pair for entry in entries if (pair := _first_exchange(entry)) is not None]
    requests: list[SampleRequest] = []
    for index in rng.permutation(len(pairs)):
        if len(requests) == num_prompts:
            break
        prompt, reply = pairs[index]
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        output_len = fixed_output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        if not _sharegpt_keeps(len(prompt_ids), output_len, fixed_output_len is not None):
            continue
        requests.append(SampleRequest(
            "" if token_mode else prompt, len(prompt_ids), output_len,
            prompt_ids if token_mode else None,
        ))
    if len(requests) < num_prompts:
        raise ValueError(
            f"{path} yields only {len(requests)} usable conversations, --num-prompts is {num_prompts}"
        )
    return requests


def _first_exchange(entry: dict[str, Any]) -> tuple[str, str] | None:
    turns = entry.get("conversations") or entry.get("conversation") or []
    if len(turns) < 2:
        return None
    prompt, reply = turns[0].get("value"), turns[1].get("value")
    if not isinstance(prompt, str) or not isinstance(reply, str):
        return None
    return prompt, reply


def _sharegpt_keeps(prompt_len: int, output_len: int, output_fixed: bool) -> bool:
    if prompt_len < _SHAREGPT_MIN_LEN or output_len < _SHAREGPT_MIN_LEN:
        return False
    if output_fixed:
        return True
    return prompt_len <= _SHAREGPT_MAX_PROMPT_LEN and prompt_len + output_len <= _SHAREGPT_MAX_TOTAL_LEN
