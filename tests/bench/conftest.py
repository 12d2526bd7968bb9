"""Fixtures for the bench tests: a small byte-level BPE tokenizer trained on the spot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box "
          "jovial ernie serves tokens in pages of cache blocks 0123456789 , . ! ? ; : "
          "naïve café straße 東京 数据 €").split()


def _corpus(n_lines: int = 400) -> list[str]:
    rng = np.random.default_rng(1234)
    return [" ".join(rng.choice(_WORDS, size=12)) for _ in range(n_lines)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")
    # An added, non-special token (like ERNIE's <think>): random prompts must not use it either.
    hf.add_tokens(["<think>"])
    return hf


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory,
                  tokenizer: PreTrainedTokenizerFast) -> Path:
    path = tmp_path_factory.mktemp("bench_tokenizer")
    tokenizer.save_pretrained(path)
    return path
