"""IncrementalDetokenizer against tokenizer.decode, on tokenizers trained here (no hub access).

Three vocabularies: GPT-style byte-level BPE (a Chinese character or emoji spans 2-4 tokens),
Llama/ERNIE-style SentencePiece BPE with byte fallback (<0xE4> tokens, a Strip decoder), and a
Metaspace Unigram (the first token loses its leading space, so context matters). The streamed
text must equal what ``decode(prompt + generated)`` adds after ``decode(prompt)``.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ernieserve.frontend.detokenizer import (
    IncrementalDetokenizer,
    LogprobTokenDecoder,
    decode_token_for_logprobs,
)
from ernieserve.sampling_params import SamplingParams

Toks = dict[str, PreTrainedTokenizerFast]
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_end|>"]
CORPUS = [
    "Hello world, this is a test of the streaming detokenizer.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps on.",
    "你好，世界！今天天气很好。我们去公园散步吧，然后回家吃饭。",
    "文心大模型是百度的语言模型，它能理解中文和英文。",
    "Emoji time 😀🎉👍🏽 and 🤖 robots, plus a 🇨🇳 flag and ❤️ hearts.",
    "Mixed: 数据 data 😀 ok? Stop here. STOP! 结束。",
    "Numbers 12345 and symbols #@$%^&*() with   spaces\tand\nnewlines.",
]
# Text the tokenizers never saw: rare Chinese characters and emoji split into bytes.
UNSEEN = ["龘靐齉 燚 𠀋 🦜🧬 naïve café", "饕餮盛宴 🫠 déjà vu — “quotes”"]


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )


def _sentencepiece_byte_fallback_bpe() -> PreTrainedTokenizerFast:
    """The Llama/ERNIE layout: "▁" for spaces, <0xXX> tokens for characters out of vocabulary."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, limit_alphabet=60, show_progress=False
    )
    trained.train_from_iterator(CORPUS * 10, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )


def _metaspace_unigram() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )


class SlowTokenizer:
    """A tokenizer without a Rust backend (like a remote-code SentencePiece one): only decode."""

    def __init__(self, fast: PreTrainedTokenizerFast) -> None:
        self.fast = fast

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **_: Any) -> str:
        return self.fast.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.fast.encode(text, add_special_tokens=add_special_tokens)


@pytest.fixture(scope="module")
def tokenizers_by_name() -> Toks:
    return {
        "byte_level": _byte_level_bpe(),
        "sp_byte_fallback": _sentencepiece_byte_fallback_bpe(),
        "metaspace": _metaspace_unigram(),
    }


def _texts(name: str) -> list[str]:
    # The Unigram vocabulary has no byte fallback: unseen characters would decode as <unk>.
    return CORPUS if name == "metaspace" else CORPUS + UNSEEN


def _stream(
    tok: Any,
    prompt: list[int],
    gen: list[int],
    params: SamplingParams,
    rng: random.Random | None = None,
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed gen (one token at a time, or in random groups of 1-3 with rng) and collect deltas."""
    detok = IncrementalDetokenizer(tok, prompt, params)
    deltas: list[str] = []
    i = 0
    while i < len(gen):
        n = 1 if rng is None else rng.randint(1, 3)
        stop = detok.update(gen[i : i + n])
        i += n
        deltas.append(detok.get_delta_text(finished=stop is not None))
        if stop is not None:
            break
    deltas.append(detok.get_delta_text(finished=True))
    return detok, deltas


def _continuation(
    tok: PreTrainedTokenizerFast, prompt: list[int], gen: list[int], skip: bool = True
) -> str:
    return tok.decode(prompt + gen, skip_special_tokens=skip)[
        len(tok.decode(prompt, skip_special_tokens=skip)) :
    ]


@pytest.mark.parametrize("name", ["byte_level", "sp_byte_fallback", "metaspace"])
@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_stream_equals_decode(tokenizers_by_name: Toks, name: str, slow: bool) -> None:
    tok = tokenizers_by_name[name]
    texts = _texts(name)
    rng = random.Random(0)
    for trial in range(60):
        ids = tok.encode(" ".join(rng.sample(texts, 2)), add_special_tokens=False)
        # Arbitrary slices: they may start or end inside a character, like a max_tokens cut.
        start = rng.randrange(len(ids))
        gen = ids[start : start + rng.randint(1, 40)]
        while name == "sp_byte_fallback" and "\ufffd" in tok.decode(gen):
            # The ByteFallback decoder turns a whole run of <0xXX> tokens into U+FFFDs when any
            # byte of it is invalid, so decode(all) is not an extension of decode(prefix) when a
            # cut splits a character; streaming (rightly) keeps the complete characters.
            start = rng.randrange(len(ids))
            gen = ids[start : start + rng.randint(1, 40)]
        if trial % 4 == 1:  # special tokens inside the output, skipped or not
            for _ in range(rng.randint(1, 4)):
                at = rng.randint(0, len(gen))
                if name == "sp_byte_fallback" and tok.decode(gen[:at]).endswith("\ufffd"):
                    continue  # inside a character: the ByteFallback quirk above again
                gen.insert(
                    at, rng.choice([tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
                )
        skip = trial % 8 != 1
        prompt = (
            []
            if trial % 3 == 0
            else [tok.bos_token_id, *tok.encode(rng.choice(texts), add_special_tokens=False)]
        )
        params = SamplingParams(skip_special_tokens=skip)
        detok, deltas = _stream(SlowTokenizer(tok) if slow else tok, prompt, gen, params, rng)
        expected = _continuation(tok, prompt, gen, skip)
        assert "".join(deltas) == expected
        assert detok.output_text == expected
        assert detok.token_ids == gen


@pytest.mark.parametrize("name", ["byte_level", "sp_byte_fallback", "metaspace"])
def test_valid_text_never_streams_replacement_char(tokenizers_by_name: Toks, name: str) -> None:
    tok = tokenizers_by_name[name]
    for text in _texts(name):
        prompt = tok.encode("Hello", add_special_tokens=False)
        gen = tok.encode(text, add_special_tokens=False)
        detok, deltas = _stream(tok, prompt, gen, SamplingParams())
        seen = ""
        for delta in deltas:
            assert "\ufffd" not in delta
            seen += delta
            assert _continuation(tok, prompt, gen).startswith(seen)
        assert seen == _continuation(tok, prompt, gen)


def test_multibyte_characters_span_several_tokens(tokenizers_by_name: Toks) -> None:
    # Guards the premise of the tests above: characters really are split across tokens.
    for name in ["byte_level", "sp_byte_fallback"]:
        tok = tokenizers_by_name[name]
        ids = tok.encode("龘🦜", add_special_tokens=False)
        assert len(ids) >= 4
        detok = IncrementalDetokenizer(tok, [], SamplingParams())
        deltas = []
        for token_id in ids:
            detok.update([token_id])
            deltas.append(detok.get_delta_text(finished=False))
        assert [d for d in deltas if d] == ["龘", "🦜"]


def test_first_token_keeps_its_space_after_prompt(tokenizers_by_name: Toks) -> None:
    for name in ["sp_byte_fallback", "metaspace"]:
        tok = tokenizers_by_name[name]
        prompt = tok.encode("Hello", add_special_tokens=False)
        gen = tok.encode(" world", add_special_tokens=False)
        gen = gen[1:] if tok.convert_ids_to_tokens(gen[0]) == "▁" and len(gen) > 1 else gen
        detok, deltas = _stream(tok, prompt, gen, SamplingParams())
        assert detok.output_text.startswith(" w"), (name, detok.output_text)
        # A prompt that ends in skipped special tokens (a chat template) still counts as context.
        prompt_with_marker = prompt + [tok.convert_tokens_to_ids("<|im_end|>")] * 9
        detok, _ = _stream(tok, prompt_with_marker, gen, SamplingParams())
        assert detok.output_text.startswith(" w"), (name, detok.output_text)


@pytest.mark.parametrize("name", ["byte_level", "sp_byte_fallback"])
def test_prompt_ending_in_byte_tokens(tokenizers_by_name: Toks, name: str) -> None:
    # The context window must start on a character: a ByteFallback run that starts with stray
    # bytes decodes entirely as U+FFFD, generated characters included.
    tok = tokenizers_by_name[name]
    prompt = tok.encode("Hi 龘靐齉", add_special_tokens=False)
    gen = tok.encode("燚𠀋 ok", add_special_tokens=False)
    for cut in range(len(prompt) + 1):
        _, deltas = _stream(tok, prompt[cut:], gen, SamplingParams())
        if "\ufffd" not in tok.decode(prompt[cut:]):
            assert "".join(deltas) == _continuation(tok, prompt[cut:], gen)
        assert "".join(deltas).lstrip(" ") == "燚𠀋 ok"  # SentencePiece encodes a leading "▁"


def test_incomplete_last_character_is_flushed_on_finish(tokenizers_by_name: Toks) -> None:
    tok = tokenizers_by_name["byte_level"]
    ids = tok.encode("ok 🦜", add_special_tokens=False)
    gen = ids[:-1]  # the emoji's last byte never comes (max_tokens)
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.update(gen)
    assert detok.get_delta_text(finished=False) == "ok "
    assert detok.get_delta_text(finished=True) == tok.decode(gen)[3:]
    assert detok.output_text == tok.decode(gen)


def test_special_tokens_skipped_or_kept(tokenizers_by_name: Toks) -> None:
    for tok in tokenizers_by_name.values():
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        gen = [
            *tok.encode("Hello world", add_special_tokens=False),
            im_end,
            *tok.encode(" 你好", add_special_tokens=False),
        ]
        prompt = [tok.bos_token_id, *tok.encode("Hi", add_special_tokens=False)]
        for skip in (True, False):
            detok, deltas = _stream(tok, prompt, gen, SamplingParams(skip_special_tokens=skip))
            assert "".join(deltas) == _continuation(tok, prompt, gen, skip)
            assert ("<|im_end|>" in detok.output_text) == (not skip)
        detok, _ = _stream(
            tok, prompt, gen, SamplingParams(skip_special_tokens=False, stop=["<|im_end|>"])
        )
        assert detok.stop_reason == "<|im_end|>" and detok.stop_token_count == gen.index(im_end) + 1


def test_detokenize_false_does_nothing(tokenizers_by_name: Toks) -> None:
    tok = tokenizers_by_name["byte_level"]
    detok = IncrementalDetokenizer(tok, [1, 2], SamplingParams(detokenize=False, stop=["a"]))
    assert detok.update(tok.encode("a cat", add_special_tokens=False)) is None
    assert detok.output_text == "" and detok.get_delta_text(finished=True) == ""
    assert detok.token_ids == tok.encode("a cat", add_special_tokens=False)


def test_complete_characters_are_not_held_behind_a_straddling_token(
    tokenizers_by_name: Toks,
) -> None:
    # The byte-level vocabulary merges the end of one CJK character with the start of the next;
    # each character must still appear with the token that completes it.
    tok = tokenizers_by_name["byte_level"]
    gen = tok.encode("模型是百度的语言模型", add_special_tokens=False)
    straddling = [
        t for t in gen if tok.decode([t]).count("\ufffd") and len(tok.convert_ids_to_tokens(t)) > 1
    ]
    assert straddling, "premise: some token holds bytes of two characters"
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    for k, token_id in enumerate(gen):
        detok.update([token_id])
        assert detok.output_text == tok.decode(gen[: k + 1]).rstrip("\ufffd")


def test_logprob_token_text(tokenizers_by_name: Toks) -> None:
    for name, tok in tokenizers_by_name.items():
        decoder = LogprobTokenDecoder(tok)
        ids = tok.encode("Hello world 你好", add_special_tokens=False)
        texts = decoder.decode_many(ids)
        assert texts == [decode_token_for_logprobs(tok, t) for t in ids]
        if name == "byte_level":
            assert "".join(texts) == "Hello world 你好"
        else:
            # Byte-fallback pieces of a character read as U+FFFD; SentencePiece's "▁" as a space.
            assert "".join(texts).replace("\ufffd", "").startswith(" Hello world")
        assert decoder.decode(tok.convert_tokens_to_ids("<|im_end|>")) == "<|im_end|>"
        assert LogprobTokenDecoder(SlowTokenizer(tok)).decode_many(ids) == texts
    byte_level = tokenizers_by_name["byte_level"]
    assert (
        decode_token_for_logprobs(byte_level, byte_level.encode("龘", add_special_tokens=False)[0])
        == "\ufffd"
    )


# -- stop strings ------------------------------------------------------------------------------


def _reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Character-at-a-time semantics: the first stop to be completed wins (longest on a tie)."""
    for end in range(1, len(text) + 1):
        ending_here = [s for s in stops if text.endswith(s, 0, end)]
        if ending_here:
            stop = max(ending_here, key=len)
            return text[: end if include else end - len(stop)], stop
    return text, None


def _token_texts(tok: PreTrainedTokenizerFast, ids: list[int]) -> list[str]:
    return [tok.decode(ids[: i + 1])[len(tok.decode(ids[:i])) :] for i in range(len(ids))]


def _check_stop(
    tok: Any, text: str, stops: list[str], include: bool, rng: random.Random | None = None
) -> IncrementalDetokenizer:
    gen = tok.encode(text, add_special_tokens=False)
    full = tok.decode(gen)
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tok, [], params)
    deltas: list[str] = []
    reported = None
    i = 0
    while i < len(gen):
        n = 1 if rng is None else rng.randint(1, 3)
        reported = detok.update(gen[i : i + n])
        i += n
        delta = detok.get_delta_text(finished=reported is not None)
        deltas.append(delta)
        expected_text, _ = _reference_stop(full, stops, include)
        # Nothing streamed is ever taken back by a later cut.
        assert expected_text.startswith("".join(deltas)), (text, stops, include, deltas)
        if reported is not None:
            break
    deltas.append(detok.get_delta_text(finished=True))
    expected_text, expected_stop = _reference_stop(full, stops, include)
    assert reported == expected_stop == detok.stop_reason, (text, stops)
    assert detok.output_text == expected_text == "".join(deltas), (text, stops, include)
    if expected_stop is not None:
        # The stop is reported by the token that completes it, not later.
        stop_end = len(expected_text) if include else len(expected_text) + len(expected_stop)
        lengths = [len(tok.decode(gen[: k + 1]).rstrip("\ufffd")) for k in range(len(gen))]
        assert detok.stop_token_count == next(k + 1 for k, n in enumerate(lengths) if n >= stop_end)
        # Later tokens add nothing.
        assert detok.update(gen) is None and detok.output_text == expected_text
    return detok


@pytest.mark.parametrize("include", [False, True])
def test_stop_inside_one_token(tokenizers_by_name: Toks, include: bool) -> None:
    tok = tokenizers_by_name["byte_level"]
    text = "Hello world, this is a test of the streaming detokenizer."
    pieces = _token_texts(tok, tok.encode(text, add_special_tokens=False))
    long_piece = max(pieces, key=len)
    assert len(long_piece.strip()) >= 3
    inner = long_piece.strip()[1:-1]  # strictly inside one token
    detok = _check_stop(tok, text, [inner], include)
    assert detok.stop_reason == inner


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("span", [2, 3])
def test_stop_straddling_tokens(tokenizers_by_name: Toks, include: bool, span: int) -> None:
    for tok in tokenizers_by_name.values():
        text = "The quick brown fox jumps over the lazy dog; the dog sleeps on."
        pieces = _token_texts(tok, tok.encode(text, add_special_tokens=False))
        # From the last char of token 4 through the first char of token 4 + span - 1.
        first, last = 4, 4 + span - 1
        stop = pieces[first][-1] + "".join(pieces[first + 1 : last]) + pieces[last][0]
        _check_stop(tok, text, [stop], include)


@pytest.mark.parametrize("include", [False, True])
def test_stop_in_multibyte_characters(tokenizers_by_name: Toks, include: bool) -> None:
    for tok in tokenizers_by_name.values():
        _check_stop(tok, "你好，世界！今天天气很好。", ["天气"], include)
        _check_stop(tok, "Emoji time 😀🎉👍🏽 and 🤖 robots", ["🎉👍"], include)


@pytest.mark.parametrize("include", [False, True])
def test_stop_at_first_token(tokenizers_by_name: Toks, include: bool) -> None:
    for tok in tokenizers_by_name.values():
        text = "Hello world"
        pieces = _token_texts(tok, tok.encode(text, add_special_tokens=False))
        # Metaspace may start with a bare "▁", which adds no text as the first token.
        k = next(i for i, piece in enumerate(pieces) if piece)
        for stop in {pieces[k], pieces[k][:1]}:
            detok = _check_stop(tok, text, [stop], include)
            assert (
                detok.output_text == (stop if include else "") and detok.stop_token_count == k + 1
            )


def test_earliest_stop_wins(tokenizers_by_name: Toks) -> None:
    tok = tokenizers_by_name["byte_level"]
    text = "The quick brown fox jumps over the lazy dog"
    detok = _check_stop(tok, text, ["lazy", "fox", "brown"], include=False)
    assert detok.stop_reason == "brown" and detok.output_text == "The quick "
    # Two stops completed by the same character: the longer one, which began first, wins.
    detok = _check_stop(tok, text, ["fox", "quick brown fox"], include=False)
    assert detok.stop_reason == "quick brown fox" and detok.output_text == "The "
    detok = _check_stop(tok, text, ["jumps", "ju"], include=True)  # "ju" completes first
    assert detok.output_text == "The quick brown fox ju"


def test_held_back_prefix_that_is_not_a_stop_is_released(tokenizers_by_name: Toks) -> None:
    tok = tokenizers_by_name["byte_level"]
    text = "Hello world, this is a test"
    gen = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["world peace"]))
    streamed = ""
    for token_id in gen:
        assert detok.update([token_id]) is None
        streamed += detok.get_delta_text(finished=False)
        if detok.output_text == "Hello world":
            assert streamed == "Hello "  # "world" could still become "world peace"
    assert "world," in streamed  # released once "," ruled the stop out
    assert streamed + detok.get_delta_text(finished=True) == text
    # With include_stop_str_in_output a stop never removes text, so nothing is held back.
    detok = IncrementalDetokenizer(
        tok, [], SamplingParams(stop=["world peace"], include_stop_str_in_output=True)
    )
    streamed = ""
    for token_id in gen:
        detok.update([token_id])
        streamed += detok.get_delta_text(finished=False)
        assert streamed == detok.output_text


@pytest.mark.parametrize("name", ["byte_level", "sp_byte_fallback", "metaspace"])
def test_random_stops_match_reference(tokenizers_by_name: Toks, name: str) -> None:
    tok = tokenizers_by_name[name]
    texts = _texts(name)
    rng = random.Random(1)
    for trial in range(80):
        text = " ".join(rng.sample(texts, 2))
        full = tok.decode(tok.encode(text, add_special_tokens=False))
        stops = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.8:
                start = rng.randrange(len(full))
                stops.append(full[start : start + rng.randint(1, 8)])
            else:
                stops.append("never appears ✗")
        _check_stop(tok, text, stops, include=rng.random() < 0.5, rng=rng if trial % 2 else None)
