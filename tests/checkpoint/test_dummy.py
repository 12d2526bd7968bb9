"""The dummy-checkpoint tool: HF-loadable layout, peaked logits, tokenizer, presets, CLI."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ernieserve.checkpoint import dummy
from ernieserve.checkpoint.cli import add_make_dummy_parser, make_dummy_main
from ernieserve.checkpoint.dummy import checkpoint_tensors, write_dummy_checkpoint
from ernieserve.checkpoint.presets import PRESETS, get_preset

WEIGHTED_TINY = [n for n, p in PRESETS.items() if p.weights and n.startswith("tiny")]
CONFIG_ONLY = [n for n, p in PRESETS.items() if not p.weights]
# The designed peakedness (see ernieserve.checkpoint.dummy): logit std ~8, so the top-1 token
# leads the runner-up by more than a quarter logit at most positions. Plain 0.02 init gives
# gaps of ~0.03 and fails this.
MIN_GAP = 0.25
MIN_PEAKED_FRACTION = 0.6

CHAT = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "你好，请介绍一下你自己。"},
]
FAMILY_MARKERS = {
    "ernie": [
        "<|begin_of_sentence|>",
        "User: Hello there\n",
        "Assistant: Hi! How can I help?<|end_of_sentence|>",
    ],
    "ernie_vl": [
        "<|begin_of_sentence|>",
        "User: Hello there",
        "\nAssistant: Hi! How can I help?<|end_of_sentence|>",
    ],
    "qwen2": ["<|im_start|>system\n", "<|im_start|>user\nHello there<|im_end|>", "<|im_start|>assistant\n"],
    "qwen3": [
        "<|im_start|>user\nHello there<|im_end|>",
        "<|im_start|>assistant\nHi! How can I help?<|im_end|>",
    ],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"],
}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = write_dummy_checkpoint(name, tmp_path_factory.mktemp(name), dtype="float32")
        return made[name]

    return get


def _load_model(path: Path, name: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if "vl" in name else AutoModelForCausalLM
    model, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True)
    return model.eval(), info


def _sample_ids(vocab_size: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    # Stay below the special-token block so the inputs look like text.
    return torch.randint(3, vocab_size - 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", WEIGHTED_TINY)
def test_hf_loads_every_tensor_and_logits_are_peaked(written, name: str) -> None:
    model, info = _load_model(written(name), name)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    vocab = get_preset(name).vocab_size
    ids = _sample_ids(vocab, batch=2, length=32)
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert logits.shape == (2, 32, vocab)
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2, dim=-1).values
    peaked = (top2[..., 0] - top2[..., 1] > MIN_GAP).float().mean().item()
    assert peaked >= MIN_PEAKED_FRACTION, f"only {peaked:.0%} of positions have a clear top-1"
    # Not a degenerate echo of the input token (the failure mode of tied embeddings).
    assert (logits.argmax(-1) == ids).float().mean() < 0.2
    # Context matters: the same last token after another prefix gives other logits.
    other = torch.cat([_sample_ids(vocab, 1, 31, seed=7), ids[:1, -1:]], dim=1)
    with torch.no_grad():
        other_logits = model(other).logits[0, -1].float()
    assert (other_logits - logits[0, -1]).abs().max() > 1.0


def test_bf16_checkpoint_keeps_routers_fp32_and_runs_finite(tmp_path: Path) -> None:
    name = "tiny-ernie-4.5-moe"
    out = write_dummy_checkpoint(name, tmp_path, dtype="bfloat16")
    dtypes = {}
    for shard in out.glob("model-*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            dtypes |= {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.1.mlp.gate.weight"] == "F32"
    assert dtypes["model.layers.1.mlp.moe_statics.e_score_correction_bias"] == "F32"
    assert dtypes["model.layers.1.mlp.experts.0.up_proj.weight"] == "BF16"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, info = _load_model(out, name, torch.bfloat16)
    assert not any(info.values()), info
    with torch.no_grad():
        logits = model(_sample_ids(get_preset(name).vocab_size, 1, 16)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", WEIGHTED_TINY)
def test_index_covers_every_tensor_in_at_least_two_shards(written, name: str) -> None:
    out = written(name)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    stored: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                assert key not in stored, f"{key} is in two shards"
                stored[key] = shard.name
                tensor = f.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    assert stored == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    assert set(stored) == {t.name for t in checkpoint_tensors(name, "float32")}
    if get_preset(name).text_config.get("tie_word_embeddings"):
        assert "lm_head.weight" not in stored


def test_moe_and_vl_are_written_in_the_hub_layout() -> None:
    moe = {t.name: t.shape for t in checkpoint_tensors("tiny-ernie-4.5-moe")}
    assert moe["model.layers.1.mlp.experts.7.down_proj.weight"] == (64, 32)
    assert moe["model.layers.1.mlp.shared_experts.gate_proj.weight"] == (64, 64)
    assert "model.layers.0.mlp.gate_proj.weight" in moe  # dense first layer
    vl = {t.name: t.shape for t in checkpoint_tensors("tiny-ernie-4.5-vl")}
    assert vl["model.layers.1.mlp.gate.weight"] == (64, 4)  # stored transposed, text router
    assert vl["model.layers.1.mlp.gate.weight_1"] == (64, 4)  # vision router
    assert vl["model.layers.1.mlp.experts.7.up_proj.weight"] == (16, 64)  # vision experts follow text
    assert vl["model.layers.1.mlp.moe_statics.e_score_correction_bias"] == (2, 4)
    assert any(n.startswith("model.vision_model.") for n in vl)


def test_vl_image_tokens_reach_the_logits(written) -> None:
    model, _ = _load_model(written("tiny-ernie-4.5-vl"), "tiny-ernie-4.5-vl")
    c = model.config
    ids = torch.tensor([[5, 6, c.image_start_token_id, *[c.image_token_id] * 4, c.image_end_token_id, 7, 8]])
    image = (ids == c.image_token_id).int()
    vision = image | (ids == c.image_start_token_id).int() | (ids == c.image_end_token_id).int()
    grid = torch.tensor([[1, 4, 4]])  # 16 patches of 14x14x3, merged 2x2 into 4 tokens
    pixels = torch.randn(16, 3 * 14 * 14, generator=torch.Generator().manual_seed(0))
    kwargs = {"image_grid_thw": grid, "mm_token_type_ids": image, "moe_mm_token_type_ids": vision}
    with torch.no_grad():
        a, b = (model(ids, pixel_values=p, **kwargs).logits[0, -1] for p in (pixels, pixels * 0.5))
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() > 1.0


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    def first_tensor(seed: int, sub: str) -> torch.Tensor:
        out = write_dummy_checkpoint("tiny-qwen3", tmp_path / sub, seed=seed, dtype="float32")
        with safe_open(next(out.glob("model-00001-*.safetensors")), framework="pt") as f:
            return f.get_tensor("model.embed_tokens.weight")

    a, b, c = first_tensor(0, "a"), first_tensor(0, "b"), first_tensor(1, "c")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", [*WEIGHTED_TINY, "ernie-4.5-0.3b"])
def test_tokenizer_matches_the_model(written, tmp_path: Path, name: str) -> None:
    from transformers import AutoTokenizer

    preset = get_preset(name)
    out = written(name) if preset.name in WEIGHTED_TINY else _config_only_copy(name, tmp_path)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.is_fast
    assert len(tok) == preset.vocab_size
    # Every id the model can emit decodes.
    decoded = tok.batch_decode([[i] for i in range(preset.vocab_size)])
    assert all(isinstance(text, str) for text in decoded)
    texts = ["The quick brown fox jumps over 13 lazy dogs.", "你好，世界！今天天气很好。", "mixed 中文 and English\n"]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for marker in FAMILY_MARKERS[preset.tokenizer.value]:
        assert marker in rendered, (marker, rendered)
    _assert_ids_agree(preset, tok)


def _config_only_copy(name: str, tmp_path: Path) -> Path:
    # The 0.3B's tokenizer without writing its 0.7 GB of weights.
    preset = get_preset(name)
    from ernieserve.checkpoint.tokenizer_builder import build_tokenizer

    build_tokenizer(
        preset.tokenizer, preset.vocab_size, tmp_path, model_max_length=preset.max_position_embeddings
    )
    (tmp_path / "config.json").write_text(json.dumps(preset.config))
    return tmp_path


def _assert_ids_agree(preset, tok) -> None:
    text_config, generation = preset.text_config, preset.generation_config
    special_ids = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in tok.get_added_vocab()}
    eos = generation["eos_token_id"]
    assert tok.eos_token_id in eos
    assert set(eos) <= special_ids
    config_eos = text_config["eos_token_id"]
    assert set(config_eos if isinstance(config_eos, list) else [config_eos]) <= special_ids
    assert text_config["bos_token_id"] == generation["bos_token_id"]
    assert text_config["bos_token_id"] in special_ids
    if tok.bos_token is not None:
        assert tok.bos_token_id == text_config["bos_token_id"]
    if "pad_token_id" in text_config:
        assert tok.pad_token_id == text_config["pad_token_id"]
    if "image_token_id" in preset.config:
        assert preset.config["image_token_id"] == tok.convert_tokens_to_ids("<|IMAGE_PLACEHOLDER|>")
        assert preset.config["video_end_token_id"] == tok.convert_tokens_to_ids("<|VIDEO_END|>")


def test_ernie_vl_template_places_images_and_closes_thinking(written) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(written("tiny-ernie-4.5-vl"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    off = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert off == (
        "<|begin_of_sentence|>User: Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
        "What is this?\nAssistant: <think>\n\n</think>\n\n"
    )
    on = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert on.endswith("\nAssistant: <think>")


@pytest.mark.parametrize("name", CONFIG_ONLY)
def test_config_only_presets_write_config_and_tokenizer(tmp_path: Path, name: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    out = write_dummy_checkpoint(name, tmp_path)
    processor_files = {"preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"}
    assert {p.name for p in out.iterdir()} == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", *(processor_files if "vision_config" in get_preset(name).config else ()),
    }  # fmt: skip
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == get_preset(name).config["architectures"]
    assert len(AutoTokenizer.from_pretrained(out)) == 103424


# Parameter counts that the names promise (0.36B, 21.8B, 300B, ~29B, 424B): a wrong width or
# layer count in a preset would move these by far more than the tolerance.
@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("ernie-4.5-0.3b", 0.36),
        ("ernie-4.5-21b-a3b", 21.8),
        ("ernie-4.5-300b-a47b", 300.0),
        ("ernie-4.5-vl-28b-a3b", 29.4),
        ("ernie-4.5-vl-424b-a47b", 424.0),
    ],
)
def test_full_size_presets_have_the_real_parameter_count(name: str, billions: float) -> None:
    total = sum(torch.Size(t.shape).numel() for t in checkpoint_tensors(name))
    assert total / 1e9 == pytest.approx(billions, rel=0.02)


def test_unknown_preset_error_lists_valid_names() -> None:
    with pytest.raises(ValueError) as error:
        get_preset("nope")
    for name in PRESETS:
        assert name in str(error.value)


def test_cli_writes_a_tiny_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="ernieserve")
    add_make_dummy_parser(parser.add_subparsers(dest="command"))
    argv = ["make-dummy", "--preset", "tiny-llama", str(tmp_path / "m"), "--seed", "3", "--dtype", "float16"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "float16"
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) >= 2

    assert make_dummy_main(parser.parse_args(["make-dummy", "--list"])) == 0
    assert "ernie-4.5-300b-a47b" in capsys.readouterr().out
    assert make_dummy_main(parser.parse_args(["make-dummy", "--preset", "tiny-llama"])) == 2
    assert make_dummy_main(parser.parse_args(["make-dummy", "--preset", "nope", str(tmp_path)])) == 2
    assert "tiny-qwen2" in capsys.readouterr().err


def test_default_model_is_written_once_and_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ERNIESERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dummy, "DEFAULT_PRESET", "tiny-ernie-4.5")  # the 0.3B takes ~20 s
    final = tmp_path / "models" / "tiny-ernie-4.5"
    assert dummy.default_model_dir() == final

    real_write = dummy.write_dummy_checkpoint

    def interrupted(preset: str, out_dir: Path, **kwargs: object) -> Path:
        real_write(preset, out_dir, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(dummy, "write_dummy_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dummy.ensure_default_model()
    assert os.listdir(final.parent) == []  # no half checkpoint, no temp folder left behind

    monkeypatch.setattr(dummy, "write_dummy_checkpoint", real_write)
    assert dummy.ensure_default_model() == final
    assert (final / "model.safetensors.index.json").is_file()
    stamp = (final / "config.json").stat().st_mtime_ns
    assert dummy.ensure_default_model() == final
    assert (final / "config.json").stat().st_mtime_ns == stamp
    assert os.listdir(final.parent) == [final.name]


def test_load_format_dummy_gives_peaked_logits(tiny_ernie):
    """--load-format dummy scales the final norm so logits have std ~FINAL_LOGIT_STD, like make-dummy
    checkpoints: greedy comparisons at real sizes (TP=2 vs TP=1, graphs vs eager) then do not ride
    on ties of near-flat logits."""
    import math

    import torch

    from ernieserve.attention.torch_ref import TorchRefBackend
    from ernieserve.checkpoint.dummy import FINAL_LOGIT_STD
    from ernieserve.config import EngineArgs
    from ernieserve.models.loader import build_model

    cfg = EngineArgs(model=str(tiny_ernie), device="cpu", load_format="dummy",
                     num_gpu_blocks_override=8).create_engine_config()
    model = build_model(cfg.model, TorchRefBackend(), torch.device("cpu"))
    hidden = model.config.hidden_size
    assert torch.allclose(model.model.norm.weight, torch.tensor(FINAL_LOGIT_STD / (0.02 * math.sqrt(hidden))))
    x = model.model.norm(torch.randn(64, hidden))  # [64, hidden], what the LM head sees
    std = model.compute_logits(x).std().item()
    assert 0.5 * FINAL_LOGIT_STD < std < 2 * FINAL_LOGIT_STD
