"""Builds a small, self-contained tokenizer folder for dummy checkpoints.

Real tokenizers cannot be downloaded here, and tests need one whose vocabulary is exactly the
model's ``vocab_size`` so that every id a random model can emit decodes to text. We train a
byte-level BPE on a short embedded English + Chinese corpus (byte-level: any text encodes and
round-trips exactly), place the family's special tokens at the family's ids, and fill the rest
of the vocabulary with pronounceable filler words.

Special-token layouts mirror the real families:
  * ERNIE 4.5: ``<unk>``/``<s>``/``</s>`` at 0/1/2. At the real vocab size (103424) the
    multimodal markers sit at the ids of the real checkpoints (``<|IMAGE_PLACEHOLDER|>`` 100295,
    ``<|IMAGE_START|>`` 101304 ... ``<|VIDEO_PLACEHOLDER|>`` 103367: the defaults of transformers'
    ``Ernie4_5_VLMoeConfig``); the other ERNIE specials get nearby ids that we could not verify
    against the real vocabulary. Smaller vocabularies keep them in one block near the end.
  * Qwen 2/3: the ChatML block (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...) in the
    real order near the end of the vocabulary (the real block starts at 151643).
  * Llama 3: ``<|begin_of_text|>`` ... ``<|python_tag|>`` in the real order near the end (the
    real block starts at 128000); like the real one it prepends the BOS when encoding.

Chat templates are our own Jinja, written to render what the real ones render for plain-text
conversations (ERNIE-4.5-0.3B-PT, ERNIE-4.5-VL with thinking and image/video markers, Qwen2.5
ChatML with its default system prompt, Qwen3 with ``enable_thinking``, Llama 3 headers).
"""

from __future__ import annotations

import enum
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers


class TokenizerFamily(enum.Enum):
    ERNIE = "ernie"
    ERNIE_VL = "ernie_vl"  # same vocabulary as ERNIE, multimodal chat template
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    LLAMA3 = "llama3"


@dataclass(slots=True, frozen=True)
class SpecialToken:
    content: str
    # False for added tokens that stay atomic but survive decode(skip_special_tokens=True)
    # (Qwen's <tool_call>, Qwen3's <think>), as in the real tokenizers.
    special: bool = True


@dataclass(slots=True, frozen=True)
class TokenizerLayout:
    """Where a family's added tokens live in a vocabulary of a given size."""

    family: TokenizerFamily
    vocab_size: int
    ids: dict[str, int]  # content -> id, for every added token
    tokens: tuple[SpecialToken, ...]
    bos_token: str | None
    eos_token: str
    unk_token: str | None
    pad_token: str | None
    named_extra: dict[str, str]  # cls/sep/mask and image/video tokens, by attribute name

    def id_of(self, content: str) -> int:
        return self.ids[content]


ERNIE_REAL_VOCAB_SIZE = 103424
# (content, id in the real 103424 vocabulary); "assumed" ids could not be checked.
_ERNIE_TOKENS: tuple[tuple[str, int], ...] = (
    ("<unk>", 0),
    ("<s>", 1),
    ("</s>", 2),
    ("<|end_of_sentence|>", 100272),  # assumed
    ("<|begin_of_sentence|>", 100273),  # assumed
    ("<pad>", 100274),  # assumed
    ("<mask:1>", 100275),  # assumed
    ("<mask:4>", 100276),  # assumed
    ("<mask:5>", 100277),  # assumed
    ("<mask:6>", 100278),  # assumed
    ("<mask:7>", 100279),  # assumed
    ("<|IMAGE_PLACEHOLDER|>", 100295),
    ("<think>", 100296),  # assumed
    ("</think>", 100297),  # assumed
    ("<|IMAGE_START|>", 101304),
    ("<|IMAGE_END|>", 101305),
    ("<|VIDEO_START|>", 101306),
    ("<|VIDEO_END|>", 101307),
    ("<|VIDEO_PLACEHOLDER|>", 103367),
)
_ERNIE_FIXED = 3  # <unk>, <s>, </s> keep ids 0..2 at every vocab size
_QWEN_TOKENS: tuple[SpecialToken, ...] = (
    *(SpecialToken(f"<|{name}|>") for name in (
        "endoftext", "im_start", "im_end", "object_ref_start", "object_ref_end", "box_start",
        "box_end", "quad_start", "quad_end", "vision_start", "vision_end", "vision_pad",
        "image_pad", "video_pad",
    )),
    SpecialToken("<tool_call>", special=False),
    SpecialToken("</tool_call>", special=False),
    *(SpecialToken(f"<|{name}|>", special=False) for name in (
        "fim_prefix", "fim_middle", "fim_suffix", "fim_pad", "repo_name", "file_sep",
    )),
)  # fmt: skip
_QWEN3_EXTRA: tuple[SpecialToken, ...] = tuple(
    SpecialToken(content, special=False)
    for content in ("<tool_response>", "</tool_response>", "<think>", "</think>")
)
_LLAMA3_TOKENS: tuple[SpecialToken, ...] = tuple(
    SpecialToken(f"<|{name}|>")
    for name in (
        "begin_of_text", "end_of_text", "reserved_special_token_0", "reserved_special_token_1",
        "finetune_right_pad_id", "reserved_special_token_2", "start_header_id", "end_header_id",
        "eom_id", "eot_id", "python_tag",
    )
)  # fmt: skip
# Filler ids after the special block, as in real checkpoints whose embedding is padded past the
# tokenizer (Qwen: 151643 + 22 specials < 151936); here they decode to filler words.
_TAIL_FILLER = 8


def tokenizer_layout(family: TokenizerFamily, vocab_size: int) -> TokenizerLayout:
    """Added-token ids for ``family`` in a vocabulary of ``vocab_size`` tokens."""
    match family:
        case TokenizerFamily.ERNIE | TokenizerFamily.ERNIE_VL:
            return _ernie_layout(family, vocab_size)
        case TokenizerFamily.QWEN2 | TokenizerFamily.QWEN3:
            block = _QWEN_TOKENS + (_QWEN3_EXTRA if family is TokenizerFamily.QWEN3 else ())
            return TokenizerLayout(
                family, vocab_size, _tail_block(block, vocab_size), block,
                bos_token=None, eos_token="<|im_end|>", unk_token=None,
                pad_token="<|endoftext|>", named_extra={},
            )  # fmt: skip
        case TokenizerFamily.LLAMA3:
            return TokenizerLayout(
                family, vocab_size, _tail_block(_LLAMA3_TOKENS, vocab_size), _LLAMA3_TOKENS,
                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token=None,
                pad_token=None, named_extra={},
            )  # fmt: skip
    raise ValueError(f"unknown tokenizer family {family!r}")


def _tail_block(block: tuple[SpecialToken, ...], vocab_size: int) -> dict[str, int]:
    start = vocab_size - len(block) - _TAIL_FILLER
    return {tok.content: start + i for i, tok in enumerate(block)}


def _ernie_layout(family: TokenizerFamily, vocab_size: int) -> TokenizerLayout:
    if vocab_size == ERNIE_REAL_VOCAB_SIZE:
        ids = dict(_ERNIE_TOKENS)
    else:
        moved = _ERNIE_TOKENS[_ERNIE_FIXED:]
        start = vocab_size - len(moved) - _TAIL_FILLER
        ids = dict(_ERNIE_TOKENS[:_ERNIE_FIXED]) | {c: start + i for i, (c, _) in enumerate(moved)}
    named_extra = {
        "cls_token": "<|begin_of_sentence|>",
        "sep_token": "<|end_of_sentence|>",
        "mask_token": "<mask:1>",
    }
    if family is TokenizerFamily.ERNIE_VL:
        named_extra |= {
            "image_token": "<|IMAGE_PLACEHOLDER|>",
            "image_start_token": "<|IMAGE_START|>",
            "image_end_token": "<|IMAGE_END|>",
            "video_token": "<|VIDEO_PLACEHOLDER|>",
            "video_start_token": "<|VIDEO_START|>",
            "video_end_token": "<|VIDEO_END|>",
        }
    # The real ERNIE tokenizer pads with <unk> (config pad_token_id 0); <pad> exists but is unused.
    return TokenizerLayout(
        family, vocab_size, ids, tuple(SpecialToken(c) for c in ids),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        named_extra=named_extra,
    )  # fmt: skip


# --------------------------------------------------------------------------- chat templates

_ERNIE_TEMPLATE = """\
{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}
{%- if not cls_token is defined -%}{%- set cls_token = "<|begin_of_sentence|>" -%}{%- endif -%}
{%- if not sep_token is defined -%}{%- set sep_token = "<|end_of_sentence|>" -%}{%- endif -%}
{{- cls_token -}}
{%- for message in messages -%}
{%- if message["role"] == "user" -%}{{- "User: " + message["content"] + "\\n" -}}
{%- elif message["role"] == "assistant" -%}{{- "Assistant: " + message["content"] + sep_token -}}
{%- elif message["role"] == "system" -%}{{- message["content"] + "\\n" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "Assistant: " -}}{%- endif -%}"""

# ERNIE 4.5 VL: images/videos become numbered placeholders, the assistant turn may carry a
# <think> block, and a generation prompt closes an empty think block unless thinking is on.
_ERNIE_VL_TEMPLATE = """\
{%- macro text_of(content) -%}
{%- if content is string -%}{{- content -}}
{%- elif content is iterable -%}{%- for item in content -%}{%- if item.type == "text" -%}{{- item.text -}}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set images = namespace(n=0) -%}{%- set videos = namespace(n=0) -%}
{{- "<|begin_of_sentence|>" -}}
{%- for message in messages -%}
{%- if message.role in ["system", "user"] -%}
{%- if message.role == "user" -%}{{- "User: " -}}{%- endif -%}
{%- if message.content is string -%}{{- message.content -}}
{%- else -%}{%- for item in message.content -%}
{%- if item.type == "text" -%}{{- item.text -}}
{%- elif item.type in ["image", "image_url"] -%}{%- set images.n = images.n + 1 -%}{{- "Picture " ~ images.n ~ ":<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" -}}
{%- elif item.type in ["video", "video_url"] -%}{%- set videos.n = videos.n + 1 -%}{{- "Video " ~ videos.n ~ ":<|VIDEO_START|><|VIDEO_PLACEHOLDER|><|VIDEO_END|>" -}}
{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- if message.role == "system" -%}{{- "\\n" -}}{%- endif -%}
{%- elif message.role == "assistant" -%}
{%- set content = text_of(message.content) -%}
{%- set reasoning = text_of(message.reasoning_content) if message.reasoning_content is defined else "" -%}
{%- if "</think>" in content -%}
{%- set reasoning = content.split("</think>")[0].split("<think>")[-1].strip("\\n") -%}
{%- set content = content.split("</think>")[-1].lstrip("\\n") -%}
{%- endif -%}
{%- if reasoning -%}{{- "\\nAssistant: <think>\\n" + reasoning.strip("\\n") + "\\n</think>\\n\\n" + content.lstrip("\\n") -}}
{%- else -%}{{- "\\nAssistant: " + content -}}{%- endif -%}
{{- "<|end_of_sentence|>" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- "\\nAssistant: " -}}
{%- if enable_thinking is defined and enable_thinking -%}{{- "<think>" -}}
{%- else -%}{{- "<think>\\n\\n</think>\\n\\n" -}}{%- endif -%}
{%- endif -%}"""

_QWEN2_TEMPLATE = """\
{%- if messages[0].role == "system" -%}
{{- "<|im_start|>system\\n" + messages[0].content + "<|im_end|>\\n" -}}
{%- else -%}
{{- "<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n" -}}
{%- endif -%}
{%- for message in messages -%}
{%- if not (loop.first and message.role == "system") -%}
{{- "<|im_start|>" + message.role + "\\n" + message.content + "<|im_end|>\\n" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\\n" -}}{%- endif -%}"""

_QWEN3_TEMPLATE = """\
{%- for message in messages -%}
{%- set content = message.content -%}
{%- if message.role == "assistant" and "</think>" in content -%}
{%- set content = content.split("</think>")[-1].lstrip("\\n") -%}
{%- endif -%}
{{- "<|im_start|>" + message.role + "\\n" + content + "<|im_end|>\\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- "<|im_start|>assistant\\n" -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- "<think>\\n\\n</think>\\n\\n" -}}{%- endif -%}
{%- endif -%}"""

_LLAMA3_TEMPLATE = """\
{{- bos_token -}}
{%- for message in messages -%}
{{- "<|start_header_id|>" + message.role + "<|end_header_id|>\\n\\n" + message.content | trim + "<|eot_id|>" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|start_header_id|>assistant<|end_header_id|>\\n\\n" -}}{%- endif -%}"""

CHAT_TEMPLATES: dict[TokenizerFamily, str] = {
    TokenizerFamily.ERNIE: _ERNIE_TEMPLATE,
    TokenizerFamily.ERNIE_VL: _ERNIE_VL_TEMPLATE,
    TokenizerFamily.QWEN2: _QWEN2_TEMPLATE,
    TokenizerFamily.QWEN3: _QWEN3_TEMPLATE,
    TokenizerFamily.LLAMA3: _LLAMA3_TEMPLATE,
}

# --------------------------------------------------------------------------- vocabulary

# Qwen2 and Llama 3 split letters, digit runs and punctuation with this pattern before the
# byte-level step; ERNIE (really a SentencePiece model) gets the plain GPT-2 byte-level split.
_QWEN_LLAMA_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
The engine schedules requests in small steps, and every step hands each running request a few new tokens.
A paged key-value cache keeps memory in fixed-size blocks, so long and short prompts share one pool.
When the cache runs out of blocks, the newest request is paused and resumed later; nothing is dropped.
Prefix caching lets two conversations that start with the same system prompt reuse the same blocks.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
Numbers matter too: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 2025, 3.14159, 1e-5 and 65536.
def forward(self, input_ids, positions): return self.lm_head(self.norm(hidden_states))
{"role": "user", "content": "What is the capital of France?"} -> "Paris is the capital of France."
Please write a short poem about the sea, the wind, the stars and the quiet harbor at night.
Large language models predict the next token from the tokens before it, one step at a time.
Researchers measure throughput in tokens per second and latency in milliseconds per token.
Mixture-of-experts layers route every token to a few experts, so only part of the model runs.
Vision-language models turn image patches into embeddings that sit between the text tokens.
She said: "I'll be there at 7:30, don't wait for me." He replied: "We're already late!"
Weather report: sunny in the morning, light rain in the afternoon, clear skies tonight.
人工智能正在改变我们的生活方式。大语言模型可以回答问题、写文章和翻译文本。
今天天气很好，我们一起去公园散步吧。你好，世界！欢迎使用推理服务引擎。
北京是中国的首都，上海是中国最大的城市之一。长江是中国最长的河流。
模型根据前面的文字预测下一个词元，一步一步地生成回答。
请用中文介绍一下你自己。我是一个乐于助人的助手，很高兴为你服务。
学习编程需要耐心和练习，每天写一点代码，慢慢就会进步。
"""


def _pre_tokenizer(family: TokenizerFamily) -> pre_tokenizers.PreTokenizer:
    if family in (TokenizerFamily.ERNIE, TokenizerFamily.ERNIE_VL):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_LLAMA_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _filler_words() -> Iterator[str]:
    # Pronounceable and unique by construction (consonant-vowel syllables of growing count), so
    # a random model's output decodes to word-like text. "Ġ" is byte-level for a leading space.
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    for count in itertools.count(2):
        for parts in itertools.product(syllables, repeat=count):
            yield "Ġ" + "".join(parts)


def _train_bpe(
    family: TokenizerFamily, max_tokens: int
) -> tuple[list[str], list[tuple[str, str]]]:
    """Learned tokens (byte alphabet first, then merges in order) and the merges."""
    trainer_model = Tokenizer(models.BPE())
    trainer_model.pre_tokenizer = _pre_tokenizer(family)
    trainer = trainers.BpeTrainer(
        vocab_size=max_tokens,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_model.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    model = json.loads(trainer_model.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return sorted(vocab, key=vocab.__getitem__), merges  # type: ignore[return-value]


def _full_vocab(layout: TokenizerLayout) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Every id 0..vocab_size-1 gets a token: specials at their ids, learned then filler tokens."""
    num_regular = layout.vocab_size - len(layout.ids)
    learned, merges = _train_bpe(layout.family, num_regular)
    taken = set(learned) | set(layout.ids)
    fillers = (word for word in _filler_words() if word not in taken)
    regular = iter(itertools.chain(learned, fillers))
    by_id = {i: c for c, i in layout.ids.items()}
    vocab = {by_id[i] if i in by_id else next(regular): i for i in range(layout.vocab_size)}
    return vocab, merges


# --------------------------------------------------------------------------- writing


def build_tokenizer(
    family: TokenizerFamily, vocab_size: int, out_dir: str | Path, *, model_max_length: int
) -> TokenizerLayout:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``.

    The result loads with ``transformers.AutoTokenizer.from_pretrained(out_dir)`` as a fast
    tokenizer with ``len(tokenizer) == vocab_size``.
    """
    layout = tokenizer_layout(family, vocab_size)
    vocab, merges = _full_vocab(layout)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(family)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(layout)
    # Specials are already in the BPE vocab at their ids, so these calls only mark them atomic.
    tokenizer.add_tokens([_added(t) for t in layout.tokens if not t.special])
    tokenizer.add_special_tokens([_added(t) for t in layout.tokens if t.special])
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError("tokenizer vocabulary does not match the model's vocab_size")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    named = _named_tokens(layout)
    extra = [t.content for t in layout.tokens if t.special and t.content not in named.values()]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": extra,
        "added_tokens_decoder": {
            str(layout.ids[t.content]): _added_entry(t) for t in layout.tokens
        },
        "add_bos_token": layout.family is TokenizerFamily.LLAMA3,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATES[family],
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", {**named, "additional_special_tokens": extra})
    return layout


def _named_tokens(layout: TokenizerLayout) -> dict[str, str]:
    named = {
        "bos_token": layout.bos_token,
        "eos_token": layout.eos_token,
        "unk_token": layout.unk_token,
        "pad_token": layout.pad_token,
    }
    return {k: v for k, v in named.items() if v is not None} | layout.named_extra


def _post_processor(layout: TokenizerLayout) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    if layout.bos_token is None or layout.family is not TokenizerFamily.LLAMA3:
        return byte_level
    bos = layout.bos_token
    template = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B:1",
        special_tokens=[(bos, layout.id_of(bos))],
    )
    return processors.Sequence([byte_level, template])


def _added(token: SpecialToken) -> AddedToken:
    return AddedToken(
        token.content,
        special=token.special,
        normalized=False,
        single_word=False,
        lstrip=False,
        rstrip=False,
    )


def _added_entry(token: SpecialToken) -> dict[str, object]:
    return {
        "content": token.content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": token.special,
    }


def _write_json(path: Path, payload: dict[str, object]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
