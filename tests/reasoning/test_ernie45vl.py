"""The ernie-45-vl reasoning parser: split at </think>, streaming and not, and the thinking switch."""

from __future__ import annotations

import pytest

from ernieserve.reasoning import get_reasoning_parser, reasoning_parser_class, reasoning_parser_names
from ernieserve.reasoning.parser import ThinkState
from ernieserve.sampling_params import SamplingParams

USER = [{"role": "user", "content": "What is 6 x 7?"}]


@pytest.fixture(scope="module")
def tokenizer(checkpoint_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_factory("tiny-ernie-4.5-vl")))


@pytest.fixture(scope="module")
def parser(tokenizer):
    return get_reasoning_parser("ernie-45-vl", tokenizer)


def prompt(tokenizer, **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def output(tokenizer, parser, reasoning: str, content: str) -> list[int]:
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    return enc(reasoning) + [parser.end_id] + enc(content)


def decode(tokenizer, ids, params: SamplingParams) -> str:
    return tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)


def test_markers_are_the_tokenizers_think_tokens(tokenizer, parser):
    assert tokenizer.convert_ids_to_tokens([parser.start_id, parser.end_id]) == ["<think>", "</think>"]


def test_template_switches_thinking(tokenizer, parser):
    on = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on.endswith("\nAssistant: <think>")
    assert off.endswith("\nAssistant: <think>\n\n</think>\n\n")  # an empty, closed think block
    assert parser.initial_state(prompt(tokenizer, enable_thinking=True)) is ThinkState.REASONING
    assert parser.initial_state(prompt(tokenizer, enable_thinking=False)) is ThinkState.CONTENT
    assert parser.initial_state(tokenizer.encode("plain text")) is ThinkState.UNDECIDED


@pytest.mark.parametrize("skip_special", [True, False])
def test_non_streaming_split(tokenizer, parser, skip_special):
    params = SamplingParams(skip_special_tokens=skip_special)
    ids = output(tokenizer, parser, "Six sevens: 6 + 6 + 6 + 6 + 6 + 6 + 6.", "\n\nThe answer is 42.")
    text = decode(tokenizer, ids, params)
    assert ("</think>" in text) is not skip_special
    reasoning, content = parser.split(prompt(tokenizer, enable_thinking=True), ids, text, params)
    assert reasoning == "Six sevens: 6 + 6 + 6 + 6 + 6 + 6 + 6."
    assert content == "\n\nThe answer is 42."


def test_unfinished_reasoning_is_all_reasoning(tokenizer, parser):
    ids = tokenizer.encode("Let me think about", add_special_tokens=False)
    assert parser.split(prompt(tokenizer, enable_thinking=True), ids, "Let me think about",
                        SamplingParams()) == ("Let me think about", "")


def test_thinking_off_means_all_content(tokenizer, parser):
    params = SamplingParams(skip_special_tokens=False)
    ids = output(tokenizer, parser, "odd", " text")  # even a stray </think> stays content
    text = decode(tokenizer, ids, params)
    assert parser.split(prompt(tokenizer, enable_thinking=False), ids, text, params) == (None, text)


def test_prompt_without_marker_follows_the_output(tokenizer, parser):
    raw = tokenizer.encode("User: hi\nAssistant: ", add_special_tokens=False)
    params = SamplingParams()
    plain = tokenizer.encode("Hello there", add_special_tokens=False)
    assert parser.split(raw, plain, "Hello there", params) == (None, "Hello there")
    thinking = [parser.start_id] + output(tokenizer, parser, "hmm", "Hello")
    assert parser.split(raw, thinking, decode(tokenizer, thinking, params), params) == ("hmm", "Hello")
    visible = SamplingParams(skip_special_tokens=False)
    assert parser.split(raw, thinking, decode(tokenizer, thinking, visible), visible) == ("hmm", "Hello")


@pytest.mark.parametrize("skip_special", [True, False])
def test_streaming_token_by_token(tokenizer, parser, skip_special):
    params = SamplingParams(skip_special_tokens=skip_special)
    ids = output(tokenizer, parser, "First, 6 x 7 ...", "\n\n42, 你好.")
    stream = parser.stream(prompt(tokenizer, enable_thinking=True), params)
    kinds, reasoning, content = [], "", ""
    shown = ""
    for n in range(1, len(ids) + 1):
        full = decode(tokenizer, ids[:n], params)
        full = full.rstrip("\ufffd")  # a detokenizer holds half characters back
        delta = stream.feed(full[len(shown):], [ids[n - 1]])
        shown = full
        assert not (delta.reasoning and delta.content)  # this output has one token per delta
        if delta.reasoning:
            kinds.append("r")
        if delta.content:
            kinds.append("c")
        reasoning += delta.reasoning
        content += delta.content
    assert (reasoning, content) == ("First, 6 x 7 ...", "\n\n42, 你好.")
    assert kinds == sorted(kinds, reverse=True)  # all reasoning deltas come before the content deltas
    assert "</think>" not in reasoning + content


def test_text_held_back_before_the_marker_stays_reasoning(tokenizer, parser):
    # The detokenizer may hold text back (a possible stop string) and release it with a later
    # token: the released text still belongs where its tokens were.
    ids = output(tokenizer, parser, "ab", "cd")
    ab, cd = tokenizer.encode("ab", add_special_tokens=False), tokenizer.encode("cd", add_special_tokens=False)
    stream = parser.stream(prompt(tokenizer, enable_thinking=True), SamplingParams())
    first = stream.feed("", ab)  # held back
    second = stream.feed("ab", [parser.end_id])  # released with the marker
    third = stream.feed("cd", cd)
    assert (first.reasoning, second.reasoning, second.content, third.content) == ("", "ab", "", "cd")
    assert len(ids) == len(ab) + 1 + len(cd)


def test_several_tokens_per_delta(tokenizer, parser):
    ids = output(tokenizer, parser, "think", "answer")
    text = decode(tokenizer, ids, SamplingParams())
    stream = parser.stream(prompt(tokenizer, enable_thinking=True), SamplingParams())
    delta = stream.feed(text, ids)
    assert (delta.reasoning, delta.content) == ("think", "answer")


def test_registry_and_its_errors(tokenizer, checkpoint_factory):
    from transformers import AutoTokenizer

    assert reasoning_parser_names() == ["ernie-45-vl", "qwen3"]
    assert reasoning_parser_class("ernie-45-vl").default_enable_thinking is True
    assert reasoning_parser_class("qwen3").default_enable_thinking is None
    with pytest.raises(ValueError, match=r"--reasoning-parser 'deepseek' is not a known reasoning parser; "
                                         r"choose from: ernie-45-vl, qwen3"):
        get_reasoning_parser("deepseek", tokenizer)
    qwen2 = AutoTokenizer.from_pretrained(str(checkpoint_factory("tiny-qwen2")))
    with pytest.raises(ValueError, match="--reasoning-parser qwen3: the tokenizer has no <think> or </think> token"):
        get_reasoning_parser("qwen3", qwen2)
    qwen3 = AutoTokenizer.from_pretrained(str(checkpoint_factory("tiny-qwen3")))
    get_reasoning_parser("qwen3", qwen3)


def test_cli_refuses_unknown_parser_names(tiny_ernie):
    from ernieserve.config import ConfigError
    from ernieserve.entrypoints.openai.api_server import build_parser
    from ernieserve.entrypoints.openai.cli_args import check_args

    args = build_parser().parse_args(["--model", str(tiny_ernie), "--reasoning-parser", "nope"])
    with pytest.raises(ConfigError, match="--reasoning-parser 'nope' is not a known reasoning parser; choose from"):
        check_args(args)
    check_args(build_parser().parse_args(["--model", str(tiny_ernie), "--reasoning-parser", "ernie-45-vl"]))
