"""ERNIE 4.5 VL against Hugging Face transformers' `Ernie4_5_VLMoeForConditionalGeneration`.

One tiny random checkpoint (preset ``tiny-ernie-4.5-vl``, original hub layout) is loaded by HF and
by our loader. Three prompts (two images; one video; text only) run through our model in one
varlen batch on the paged torch reference attention, then again in two chunks (the first ending
inside an image's and a video's placeholder run, the second attending to the cached first), and
their logits are compared with HF's under teacher forcing. Then a few greedy decode steps with
``positions = p + delta`` against HF's `generate`. Images go through HF's own (PIL) image
processor; the video's pixel rows are random, in the processor's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ernieserve.attention.base import AttentionMetadata
from ernieserve.attention.torch_ref import TorchRefBackend
from ernieserve.config import EngineArgs
from ernieserve.models.loader import build_model
from ernieserve.multimodal.inputs import MultiModalItem

BLOCK = 16
NUM_BLOCKS = 32
ATOL = 2e-4


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(checkpoint_factory) -> Path:
    return checkpoint_factory("tiny-ernie-4.5-vl")


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    model, info = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(str(ckpt), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.float().eval()


@pytest.fixture(scope="module")
def ours(ckpt):
    cfg = EngineArgs(model=str(ckpt), device="cpu", num_gpu_blocks_override=NUM_BLOCKS,
                     block_size=BLOCK).create_engine_config()
    return build_model(cfg.model, TorchRefBackend(), cfg.device.device)


@dataclass
class Prompt:
    ids: list[int]
    items: list[MultiModalItem] = field(default_factory=list)
    hf_kwargs: dict = field(default_factory=dict)  # pixel_values / image_grid_thw / video ...


def _text(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(100, 4000, n).tolist()


@pytest.fixture(scope="module")
def prompts(hf) -> list[Prompt]:
    from PIL import Image
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    cfg = hf.config
    rng = np.random.default_rng(0)
    # two images: 56x84 -> grid (1, 4, 6) = 6 tokens; 84x112 -> (1, 6, 8) = 12 tokens
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(56, 84), (84, 112)]]
    processed = Ernie4_5_VLMoeImageProcessorPil()(images=images, return_tensors="pt")
    grids = processed["image_grid_thw"]
    rows = processed["pixel_values"].split([int(g.prod()) for g in grids])
    ids = _text(rng, 5)
    items = []
    for i, (g, pix) in enumerate(zip(grids, rows)):
        n = int(g.prod()) // 4
        ids.append(cfg.image_start_token_id)
        items.append(MultiModalItem.from_pixels("image", len(ids), n, g.tolist(), pix))
        ids += [cfg.image_token_id] * n + [cfg.image_end_token_id] + _text(rng, 3 + i)
    two_images = Prompt(ids, items, {"pixel_values": processed["pixel_values"], "image_grid_thw": grids})

    # one video of 4 frames of 4x6 patches: 4 * 4 * 6 / (2 * 2 * 2) = 12 tokens
    grid = [4, 4, 6]
    pixels = torch.from_numpy(rng.standard_normal((96, 588)).astype(np.float32))
    ids = _text(rng, 4) + [cfg.video_start_token_id]
    item = MultiModalItem.from_pixels("video", len(ids), 12, grid, pixels)
    ids += [cfg.video_token_id] * 12 + [cfg.video_end_token_id] + _text(rng, 3)
    video = Prompt(ids, [item], {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([grid])})
    return [two_images, video, Prompt(_text(rng, 12))]


# ---- HF side -------------------------------------------------------------------------------

def hf_token_types(hf, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mm_token_type_ids, moe_mm_token_type_ids) [1, P], as HF's processor makes them."""
    from transformers.models.ernie4_5_vl_moe.processing_ernie4_5_vl_moe import Ernie4_5_VLMoeProcessor

    c = hf.config
    t = torch.tensor([ids])
    mm = torch.zeros_like(t)
    mm[t == c.image_token_id] = 1
    mm[t == c.video_token_id] = 2
    names = ["image_token_id", "image_start_token_id", "image_end_token_id",
             "video_token_id", "video_start_token_id", "video_end_token_id"]
    proc = SimpleNamespace(**{n: getattr(c, n) for n in names})
    moe = Ernie4_5_VLMoeProcessor.create_moe_mm_token_type_ids(proc, t)
    return mm, torch.as_tensor(moe).long()


def hf_inputs(hf, p: Prompt) -> dict:
    mm, moe = hf_token_types(hf, p.ids)
    return {"input_ids": torch.tensor([p.ids]), "mm_token_type_ids": mm, "moe_mm_token_type_ids": moe,
            **p.hf_kwargs}


@torch.no_grad()
def hf_logits(hf, p: Prompt) -> torch.Tensor:
    return hf(**hf_inputs(hf, p)).logits[0]


# ---- our side: hand-built varlen steps over a paged KV cache ------------------------------

class Driver:
    def __init__(self, model) -> None:
        self.model = model
        layer = model.attention_layers()[0]
        shape = (NUM_BLOCKS, BLOCK, layer.num_kv_heads, layer.head_dim)
        model.bind_kv_caches([(torch.zeros(shape), torch.zeros(shape)) for _ in model.attention_layers()])
        self.blocks: list[list[int]] = []
        self.tokens: list[list[int]] = []
        self.positions: list[np.ndarray] = []  # [3, P] per request
        self.deltas: list[int] = []
        self.items: list[list[MultiModalItem]] = []
        self.embeds: list[list[torch.Tensor]] = []
        self.done: list[int] = []

    def add(self, p: Prompt, max_len: int = 64) -> None:
        n, first = -(-max_len // BLOCK), sum(len(b) for b in self.blocks)
        assert first + n <= NUM_BLOCKS
        self.blocks.append(list(range(first, first + n)))
        self.tokens.append(list(p.ids))
        pos, delta = self.model.get_mrope_positions(p.ids, p.items)
        self.positions.append(pos)
        self.deltas.append(delta)
        self.items.append(p.items)
        self.embeds.append(self.model.embed_multimodal(p.items))
        self.done.append(0)

    def position(self, r: int, start: int, end: int) -> np.ndarray:
        """Prompt rows from get_mrope_positions, generated tokens at p + delta."""
        prompt = self.positions[r]
        gen = np.arange(max(start, prompt.shape[1]), end) + self.deltas[r]
        return np.concatenate([prompt[:, start:end], np.broadcast_to(gen, (3, len(gen)))], axis=1)

    @torch.inference_mode()
    def step(self, counts: list[int]) -> list[torch.Tensor]:
        """Runs the next counts[r] tokens of each request (0 = skip); returns their logits."""
        reqs = [r for r, c in enumerate(counts) if c]
        ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
        splices = []  # (row in this step, multimodal rows)
        for r in reqs:
            start, end = self.done[r], self.done[r] + counts[r]
            for item, rows in zip(self.items[r], self.embeds[r]):
                lo, hi = max(item.offset, start), min(item.end, end)
                if lo < hi:
                    splices.append((qsl[-1] + lo - start, rows[lo - item.offset:hi - item.offset]))
            ids += self.tokens[r][start:end]
            pos.append(self.position(r, start, end))
            slots += [self.blocks[r][t // BLOCK] * BLOCK + t % BLOCK for t in range(start, end)]
            qsl.append(qsl[-1] + end - start)
            seq_lens.append(end)
        max_blocks = max(len(self.blocks[r]) for r in reqs)
        tables = torch.tensor([self.blocks[r] + [0] * (max_blocks - len(self.blocks[r])) for r in reqs],
                              dtype=torch.int32)
        qsl_t, seq_t = torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32)
        meta = AttentionMetadata(
            num_reqs=len(reqs), num_tokens=len(ids), max_query_len=max(counts), max_seq_len=max(seq_lens),
            query_start_loc=qsl_t, seq_lens=seq_t, block_tables=tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64), query_start_loc_cpu=qsl_t, seq_lens_cpu=seq_t,
            is_decode_only=all(counts[r] == 1 for r in reqs))
        input_ids = torch.tensor(ids)
        embeds = None
        if splices:
            embeds = self.model.embed_input_ids(input_ids)
            for row, rows in splices:
                embeds[row:row + rows.shape[0]] = rows
        positions = torch.from_numpy(np.concatenate(pos, axis=1))
        logits = self.model.compute_logits(self.model(input_ids, positions, meta, inputs_embeds=embeds))
        out = []
        for i, r in enumerate(reqs):
            self.done[r] += counts[r]
            out.append(logits[qsl[i]:qsl[i + 1]])
        return out


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


# ---- tests ---------------------------------------------------------------------------------

def test_checkpoint_loads_into_both(hf, ours) -> None:
    """Same tensors on both sides, through both checkpoint layouts' conversions."""
    lm = hf.model.language_model
    for i, (a, b) in enumerate(zip(ours.model.layers, lm.layers)):
        assert torch.equal(a.self_attn.qkv_proj.weight[:64], b.self_attn.q_proj.weight)
        if hasattr(b.mlp, "text_moe"):
            for part in ("text_moe", "vision_moe"):
                ta, tb = getattr(a.mlp, part), getattr(b.mlp, part)
                assert torch.equal(ta.experts.w13, tb.experts.gate_up_proj), (i, part)
                assert torch.equal(ta.experts.w2, tb.experts.down_proj), (i, part)
                assert torch.equal(ta.gate.weight, tb.gate.weight), (i, part)
                assert torch.equal(ta.gate.e_score_correction_bias, tb.gate.moe_statics.e_score_correction_bias[0])
    assert torch.equal(ours.vision_model.blocks[1].attn.qkv.weight, hf.model.vision_tower.blocks[1].attn.qkv.weight)
    assert torch.equal(ours.resampler_model.temporal_linear.ln.weight,
                       hf.model.resampler_model.temporal_linear.ln.weight)


def test_loads_hf_in_memory_layout(hf, ours, tmp_path) -> None:
    """A checkpoint in HF's in-memory names (language_model, vision_tower, stacked text/vision
    experts) fills the same parameters."""
    fresh = type(ours)(ours.config, TorchRefBackend(), torch.float32)
    loaded = fresh.load_weights(hf.state_dict().items())
    assert loaded >= {n for n, _ in fresh.named_parameters()}
    theirs = dict(ours.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, theirs[name]), name
    for a, b in zip(fresh.buffers(), ours.buffers()):
        assert torch.equal(a, b)


def test_vision_embeddings_match_hf(hf, ours, prompts) -> None:
    images, video = prompts[0], prompts[1]
    with torch.no_grad():
        ref_img = hf.model.get_image_features(images.hf_kwargs["pixel_values"],
                                              images.hf_kwargs["image_grid_thw"]).pooler_output
        ref_vid = hf.model.get_video_features(video.hf_kwargs["pixel_values_videos"],
                                              video.hf_kwargs["video_grid_thw"]).pooler_output
    # all three items in one vision pass
    got = ours.embed_multimodal(images.items + video.items)
    for a, b in zip(got, list(ref_img) + list(ref_vid), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mrope_positions_match_hf_get_rope_index(hf, ours, prompts) -> None:
    for p in prompts:
        pos, delta = ours.get_mrope_positions(p.ids, p.items)
        if p.items:
            inputs = hf_inputs(hf, p)
            ref, ref_delta = hf.model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                video_grid_thw=inputs.get("video_grid_thw"))
            ref, ref_delta = ref[:, 0].numpy(), int(ref_delta)
        else:  # HF's text-only positions: arange in all three rows, delta 0
            ref, ref_delta = np.broadcast_to(np.arange(len(p.ids)), (3, len(p.ids))), 0
        assert pos.dtype == np.int64 and pos.shape == (3, len(p.ids))
        np.testing.assert_array_equal(pos, ref)
        assert delta == ref_delta
    assert ours.get_mrope_positions(prompts[1].ids, prompts[1].items)[1] != 0  # the video case is not trivial


def test_prefill_one_batch_matches_hf(hf, ours, prompts) -> None:
    drv = Driver(ours)
    for p in prompts:
        drv.add(p)
    for p, got in zip(prompts, drv.step([len(p.ids) for p in prompts])):
        assert_logits_match(got, hf_logits(hf, p))


def test_chunked_prefill_matches_hf(hf, ours, prompts) -> None:
    """First chunks end inside image 1's run (3 of 6 rows) and inside the video's run (5 of 12)."""
    images, video, text = prompts
    first = [images.items[0].offset + 3, video.items[0].offset + 5, 5]
    drv = Driver(ours)
    for p in prompts:
        drv.add(p)
    part1 = drv.step(first)
    part2 = drv.step([len(p.ids) - f for p, f in zip(prompts, first)])
    for p, a, b in zip(prompts, part1, part2):
        assert_logits_match(torch.cat([a, b]), hf_logits(hf, p))


def test_greedy_decode_matches_hf_generate(hf, ours, prompts) -> None:
    from transformers import GenerationConfig

    steps = 4
    drv = Driver(ours)
    for p in prompts:
        drv.add(p)
    last = [lg[-1] for lg in drv.step([len(p.ids) for p in prompts])]
    generated: list[list[int]] = [[] for _ in prompts]
    decode_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for _ in range(steps):
        for r, lg in enumerate(last):
            generated[r].append(int(lg.argmax()))
            drv.tokens[r].append(generated[r][-1])
        last = [lg[-1] for lg in drv.step([1] * len(prompts))]  # decode-only: positions p + delta
        for r, lg in enumerate(last):
            decode_logits[r].append(lg)
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
    for p, ours_tokens, ours_logits in zip(prompts, generated, decode_logits):
        with torch.no_grad():
            out = hf.generate(**hf_inputs(hf, p), generation_config=gen_cfg)
        assert out[0, len(p.ids):].tolist() == ours_tokens
        # and the decode steps' logits, against HF on prompt + generated under teacher forcing
        full = Prompt(p.ids + ours_tokens, p.items, p.hf_kwargs)
        assert_logits_match(torch.stack(ours_logits), hf_logits(hf, full)[len(p.ids):])


def test_decode_only_steps_skip_vision_experts(ours, prompts, monkeypatch) -> None:
    """Generated tokens are text tokens; decode-only steps (CUDA graphs) never branch on ids."""
    drv = Driver(ours)
    drv.add(prompts[0])
    drv.step([len(prompts[0].ids)])
    drv.tokens[0].append(ours.config.image_start_token_id)  # even a vision-type id
    monkeypatch.setattr(type(ours), "_modality_split", lambda *a: pytest.fail("split in a decode-only step"))
    for layer in ours.model.layers:
        if hasattr(layer.mlp, "vision_moe"):
            monkeypatch.setattr(layer.mlp.vision_moe, "forward", lambda *a: pytest.fail("vision experts ran"))
    drv.step([1])


def test_both_architecture_spellings_resolve() -> None:
    from ernieserve.models.ernie4_5_vl import Ernie4_5_VLMoeForConditionalGeneration
    from ernieserve.models.registry import resolve_model_class

    for arch in ("Ernie4_5_VLMoeForConditionalGeneration", "Ernie4_5_VL_MoeForConditionalGeneration"):
        cls = resolve_model_class([arch])
        assert issubclass(cls, Ernie4_5_VLMoeForConditionalGeneration)
        assert cls.supports_multimodal and cls.uses_mrope and cls.takes_full_config


def test_bad_items_are_rejected(ours, prompts) -> None:
    images = prompts[0]
    item = images.items[0]
    wrong_len = MultiModalItem.from_pixels("image", item.offset, item.length - 1, item.grid_thw, item.pixels())
    with pytest.raises(ValueError, match=r"items\[0\]\.length"):
        ours.get_mrope_positions(images.ids, [wrong_len, images.items[1]])
    with pytest.raises(ValueError, match="placeholder outside"):
        ours.get_mrope_positions(images.ids, images.items[:1])
    shifted = MultiModalItem.from_pixels("image", item.offset - 1, item.length, item.grid_thw, item.pixels())
    with pytest.raises(ValueError, match="not all image placeholder"):
        ours.get_mrope_positions(images.ids, [shifted, images.items[1]])
    odd = MultiModalItem.from_pixels("video", 0, 6, [3, 4, 4], torch.zeros(48, 588))
    with pytest.raises(ValueError, match=r"items\[0\]\.grid_thw"):
        ours.embed_multimodal([odd])


@pytest.mark.parametrize("preset", ["ernie-4.5-vl-28b-a3b", "ernie-4.5-vl-424b-a47b"])
def test_full_size_checkpoint_names_fill_every_parameter(preset: str) -> None:
    """The real models' on-disk names and shapes (HF's own save layout, on the meta device) fill
    every parameter of ours, with no tensor left over."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ernieserve.checkpoint.dummy import checkpoint_tensors
    from ernieserve.checkpoint.presets import get_preset
    from ernieserve.models.ernie4_5_vl import Ernie4_5_VLMoeForConditionalGeneration

    config = get_preset(preset).config
    cfg = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
    with torch.device("meta"):
        model = Ernie4_5_VLMoeForConditionalGeneration(cfg, TorchRefBackend(), torch.bfloat16)
    specs = checkpoint_tensors(preset)
    loaded = model.load_weights((s.name, torch.empty(s.shape, dtype=s.dtype, device="meta")) for s in specs)
    assert loaded == {n for n, _ in model.named_parameters()}
