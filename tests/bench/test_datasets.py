"""Prompt generators: lengths, shared prefixes, seeds, excluded tokens, ShareGPT filtering."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from ernieserve.bench.datasets import (
    DatasetConfig, DatasetName, prefix_repetition_requests, random_requests, sample_requests,
    sampleable_token_ids, sharegpt_requests,
)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _common_prefix(texts: list[str]) -> str:
    return os.path.commonprefix(texts)


def test_random_text_lengths_hit_target(tokenizer) -> None:
    rng = np.random.default_rng(0)
    reqs = random_requests(tokenizer, rng, 30, input_len=64, output_len=16)
    assert len(reqs) == 30
    for r in reqs:
        assert r.prompt_token_ids is None
        assert r.prompt_len == _count(tokenizer, r.prompt)  # counted with the model's tokenizer
        assert abs(r.prompt_len - 64) <= 1
        assert r.expected_output_len == 16


def test_random_lengths_within_range(tokenizer) -> None:
    rng = np.random.default_rng(1)
    reqs = random_requests(tokenizer, rng, 200, input_len=40, output_len=20, range_ratio=0.5,
                           token_mode=True)
    in_lens = [r.prompt_len for r in reqs]
    out_lens = [r.expected_output_len for r in reqs]
    assert min(in_lens) >= 20 and max(in_lens) <= 60
    assert min(out_lens) >= 10 and max(out_lens) <= 30
    assert len(set(in_lens)) > 10  # actually spread, not collapsed to one value
    # Token mode: exact lengths, ids handed over as they are.
    assert all(len(r.prompt_token_ids) == r.prompt_len for r in reqs)


def test_random_text_lengths_within_range(tokenizer) -> None:
    rng = np.random.default_rng(2)
    reqs = random_requests(tokenizer, rng, 40, input_len=30, output_len=8, range_ratio=0.3)
    lo, hi = math.floor(30 * 0.7), math.ceil(30 * 1.3)
    for r in reqs:
        assert lo - 1 <= r.prompt_len <= hi + 1
        assert r.prompt_len == _count(tokenizer, r.prompt)


def test_range_ratio_validated(tokenizer) -> None:
    with pytest.raises(ValueError, match="range-ratio"):
        random_requests(tokenizer, np.random.default_rng(0), 2, 10, 10, range_ratio=1.0)


def test_special_and_added_tokens_never_sampled(tokenizer) -> None:
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    allowed = set(sampleable_token_ids(tokenizer).tolist())
    assert allowed and not allowed & excluded
    reqs = random_requests(tokenizer, np.random.default_rng(3), 50, 64, 4, token_mode=True)
    assert not {t for r in reqs for t in r.prompt_token_ids} & excluded
    text_reqs = random_requests(tokenizer, np.random.default_rng(3), 20, 64, 4)
    for r in text_reqs:
        assert not set(tokenizer.encode(r.prompt, add_special_tokens=False)) & excluded


def test_random_prefix_shared_exactly(tokenizer) -> None:
    prefix_len, input_len = 24, 16
    reqs = random_requests(tokenizer, np.random.default_rng(4), 20, input_len, 8,
                           prefix_len=prefix_len)
    prefix = _common_prefix([r.prompt for r in reqs])
    assert abs(_count(tokenizer, prefix) - prefix_len) <= 1
    for r in reqs:
        assert r.prompt.startswith(prefix)
        assert abs(r.prompt_len - (prefix_len + input_len)) <= 1
    # Token mode: the first prefix_len ids are identical in every prompt.
    token_reqs = random_requests(tokenizer, np.random.default_rng(4), 20, input_len, 8,
                                 prefix_len=prefix_len, token_mode=True)
    heads = {tuple(r.prompt_token_ids[:prefix_len]) for r in token_reqs}
    assert len(heads) == 1
    assert all(r.prompt_len == prefix_len + input_len for r in token_reqs)


def test_prefix_repetition_token_mode(tokenizer) -> None:
    reqs = prefix_repetition_requests(tokenizer, np.random.default_rng(5), 12, prefix_len=20,
                                      suffix_len=10, num_prefixes=3, output_len=7,
                                      token_mode=True)
    assert len(reqs) == 12
    groups: dict[tuple[int, ...], int] = {}
    for r in reqs:
        assert r.prompt_len == 30 and r.expected_output_len == 7
        key = tuple(r.prompt_token_ids[:20])
        groups[key] = groups.get(key, 0) + 1
    assert sorted(groups.values()) == [4, 4, 4]


def test_prefix_repetition_text_mode(tokenizer) -> None:
    reqs = prefix_repetition_requests(tokenizer, np.random.default_rng(6), 12, prefix_len=20,
                                      suffix_len=10, num_prefixes=3, output_len=7)
    groups: dict[str, list[str]] = {}
    for r in reqs:
        groups.setdefault(r.prompt[:8], []).append(r.prompt)
        assert abs(r.prompt_len - 30) <= 1
    assert sorted(len(g) for g in groups.values()) == [4, 4, 4]
    for members in groups.values():
        shared = _common_prefix(members)
        assert _count(tokenizer, shared) >= 19  # the whole prefix, as text, in every member


def test_seed_reproducibility(tokenizer) -> None:
    def run(seed: int) -> list[tuple[str, int, int]]:
        config = DatasetConfig(name=DatasetName.RANDOM, num_prompts=10, seed=seed,
                               random_input_len=32, random_output_len=8, random_range_ratio=0.25,
                               random_prefix_len=5)
        return [(r.prompt, r.prompt_len, r.expected_output_len)
                for r in sample_requests(config, tokenizer)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sharegpt(tokenizer, tmp_path: Path) -> None:
    long_reply = "the quick brown fox " * 20
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "tell me about the lazy dog"},
                                      {"from": "gpt", "value": long_reply}]},
        {"id": "b", "conversations": [{"from": "human", "value": "hi"},  # too short: dropped
                                      {"from": "gpt", "value": long_reply}]},
        {"id": "c", "conversations": [{"from": "human", "value": "only one turn here"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "seven wizards box the fox"},
                                      {"from": "gpt", "value": "jovial ernie serves tokens!"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    reqs = sharegpt_requests(tokenizer, np.random.default_rng(0), str(path), 2)
    assert {r.prompt for r in reqs} == {"tell me about the lazy dog", "seven wizards box the fox"}
    for r in reqs:
        assert r.prompt_len == _count(tokenizer, r.prompt)
    by_prompt = {r.prompt: r for r in reqs}
    assert by_prompt["tell me about the lazy dog"].expected_output_len == _count(tokenizer, long_reply)
    fixed = sharegpt_requests(tokenizer, np.random.default_rng(0), str(path), 2, fixed_output_len=5)
    assert all(r.expected_output_len == 5 for r in fixed)
    with pytest.raises(ValueError, match="usable"):
        sharegpt_requests(tokenizer, np.random.default_rng(0), str(path), 3)
