"""The multimodal processor against transformers' own Ernie4_5_VLMoeProcessor.

Images: input_ids, pixel_values and image_grid_thw equal HF's everywhere. Videos: HF's video
processor needs torchvision, so the comparison with it runs only where torchvision imports (run
it in a venv with torch 2.14.1 + torchvision 0.29.1); everywhere else the video path is checked
against its definition (per-frame image processing, see ernieserve/multimodal/processor.py).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ernieserve.multimodal.media import VideoFrames
from ernieserve.multimodal.options import parse_mm_processor_kwargs
from ernieserve.multimodal.processor import MultiModalProcessor

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
FONTS = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
IMG = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
VID = "<|VIDEO_START|><|VIDEO_PLACEHOLDER|><|VIDEO_END|>"
LIMITS = {"image": 8, "video": 4}


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory) -> Path:
    return checkpoint_factory("tiny-ernie-4.5-vl")


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))


@pytest.fixture(scope="module")
def hf_config(ckpt):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(ckpt))


def make_processor(folder, hf_config, **kwargs) -> MultiModalProcessor:
    return MultiModalProcessor.from_pretrained(folder, hf_config, parse_mm_processor_kwargs(kwargs), LIMITS)


def images(*sizes: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def video_array(frames: int, width: int = 80, height: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def hf_processor(folder, tokenizer):
    """transformers' processor. Without torchvision its video processor cannot be built, so the
    image-only comparison skips the processor's class check for that one missing part."""
    if HAS_TORCHVISION:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(folder))
    from transformers import AutoImageProcessor
    from transformers.models.ernie4_5_vl_moe.processing_ernie4_5_vl_moe import Ernie4_5_VLMoeProcessor

    class ImageOnly(Ernie4_5_VLMoeProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    return ImageOnly(image_processor=AutoImageProcessor.from_pretrained(str(folder)), tokenizer=tokenizer,
                     video_processor=None)


# ---- images: equal to HF ------------------------------------------------------------------------
def test_images_match_hf_processor(ckpt, tokenizer, hf_config):
    text = f"User: Picture 1:{IMG}Compare with Picture 2:{IMG} and say which is brighter.\nAssistant: "
    imgs = images((90, 60), (130, 200), (40, 40))[:2]
    ours = make_processor(ckpt, hf_config)
    ids, items = ours.process(tokenizer.encode(text, add_special_tokens=False), imgs)
    ref = hf_processor(ckpt, tokenizer)(images=imgs, text=[text], return_tensors="pt", add_special_tokens=False)
    assert ids == ref["input_ids"][0].tolist()
    assert torch.equal(torch.cat([i.pixels() for i in items]), ref["pixel_values"])
    assert [i.grid_thw for i in items] == ref["image_grid_thw"].tolist()
    # each item's run: placeholder tokens at [offset, offset + length), between the start/end markers
    tok = ours.tokens
    for item in items:
        assert item.modality == "image"
        assert ids[item.offset - 1] == tok.image_start and ids[item.end] == tok.image_end
        assert set(ids[item.offset:item.end]) == {tok.image}
        assert item.length == np.prod(item.grid_thw) // 4
        assert item.shape == [int(np.prod(item.grid_thw)), 3 * 14 * 14]


def test_pixel_bounds_from_mm_processor_kwargs(ckpt, tokenizer, hf_config):
    ids = tokenizer.encode(f"x{IMG}y", add_special_tokens=False)
    big = images((400, 300))
    default = make_processor(ckpt, hf_config).process(ids, big)[1][0]
    small = make_processor(ckpt, hf_config, image_max_pixels=28 * 28 * 4).process(ids, big)[1][0]
    alias = make_processor(ckpt, hf_config, max_pixels=28 * 28 * 4).process(ids, big)[1][0]
    assert np.prod(default.grid_thw) > np.prod(small.grid_thw) and small.length <= 4
    assert small.hash == alias.hash
    # the same bounds handed to HF's processor give the same grid
    ref = hf_processor(ckpt, tokenizer)(images=big, text=[f"x{IMG}y"], return_tensors="pt",
                                        size={"shortest_edge": 3136, "longest_edge": 28 * 28 * 4})
    assert small.grid_thw == ref["image_grid_thw"][0].tolist()


def test_placeholder_count_must_match_media(ckpt, tokenizer, hf_config):
    proc = make_processor(ckpt, hf_config)
    ids = tokenizer.encode(f"one {IMG}", add_special_tokens=False)
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) but 2 image\(s\) were given"):
        proc.process(ids, images((30, 30), (30, 30)))
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) but 0 image\(s\)"):
        proc.process(ids)
    assert proc.process([1, 2, 3]) == ([1, 2, 3], [])


def test_limit_per_prompt(ckpt, hf_config, tokenizer):
    proc = MultiModalProcessor.from_pretrained(ckpt, hf_config, limit_per_prompt={"image": 1, "video": 0})
    ids = tokenizer.encode(f"{IMG}{IMG}", add_special_tokens=False)
    with pytest.raises(ValueError, match=r"At most 1 image\(s\) per prompt .*--limit-mm-per-prompt image=1.*has 2"):
        proc.process(ids, images((30, 30), (30, 30)))
    with pytest.raises(ValueError, match=r"At most 0 video\(s\)"):
        proc.check_limits(0, 1)


def test_processor_options_are_checked():
    with pytest.raises(ValueError, match="--mm-processor-kwargs: unknown key 'frobnicate'; known keys:"):
        parse_mm_processor_kwargs('{"frobnicate": 1}')
    with pytest.raises(ValueError, match="'video_fps' must be a positive number"):
        parse_mm_processor_kwargs({"video_fps": 0})
    with pytest.raises(ValueError, match="image_min_pixels .* is larger than image_max_pixels"):
        parse_mm_processor_kwargs({"min_pixels": 10000, "max_pixels": 100})
    with pytest.raises(ValueError, match="'video_frames_sample' must be one of leading, middle"):
        parse_mm_processor_kwargs({"video_frames_sample": "rand"})
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_mm_processor_kwargs("{video_fps: 1}")
    opts = parse_mm_processor_kwargs('{"video_max_frames": 30, "fps": 1, "target_frames": -1}')
    assert (opts.video_max_frames, opts.video_fps, opts.video_target_frames) == (30, 1.0, -1)


def test_architecture_constants_must_match(ckpt, hf_config):
    make_processor(ckpt, hf_config, spatial_conv_size=2, temporal_conv_size=2)
    with pytest.raises(ValueError, match="spatial_conv_size 3 does not match the model's merge size 2"):
        make_processor(ckpt, hf_config, spatial_conv_size=3)


# ---- videos: defined by per-frame image processing ----------------------------------------------
def test_video_is_its_frames_through_the_image_processor(ckpt, tokenizer, hf_config):
    proc = make_processor(ckpt, hf_config)
    frames = video_array(5)  # odd: the last frame is repeated
    ids, items = proc.process(tokenizer.encode(f"Video 1:{VID}?", add_special_tokens=False), videos=[frames])
    (item,) = items
    video = proc.video
    size = {"shortest_edge": video.min_pixels, "longest_edge": video.max_pixels}
    padded = [Image.fromarray(f) for f in frames] + [Image.fromarray(frames[-1])]
    ref = proc.image_processor(images=padded, return_tensors="pt", size=size, temporal_patch_size=1,
                               **video.frame_kwargs)
    assert torch.equal(item.pixels(), ref["pixel_values"])
    t, h, w = item.grid_thw
    assert t == 6 and [1, h, w] == ref["image_grid_thw"][0].tolist()
    assert item.modality == "video" and item.length == t * h * w // (4 * 2)
    assert ids[item.offset - 1] == proc.tokens.video_start and ids[item.end] == proc.tokens.video_end
    assert set(ids[item.offset:item.end]) == {proc.tokens.video}
    assert h * w * 14 * 14 <= video.max_pixels  # the video bounds, not the image ones


def test_video_token_count_matches_hf_formula(ckpt, hf_config):
    proc = make_processor(ckpt, hf_config, video_max_pixels=28 * 28 * 4)
    rows, grid, tokens = proc.process_video(video_array(4, 200, 100))
    assert tokens == np.prod(grid) // (proc.merge_size ** 2 * 2) and rows.shape[0] == np.prod(grid)
    assert grid[1] * grid[2] * 14 * 14 <= 28 * 28 * 4


@pytest.mark.skipif(not any(f.is_file() for f in FONTS), reason="no TrueType font on this machine")
def test_timestamps_are_drawn_when_the_config_asks(ckpt, hf_config, tmp_path):
    folder = _with_timestamp_font(ckpt, tmp_path)
    plain = make_processor(ckpt, hf_config)
    drawn = make_processor(folder, hf_config)
    assert drawn.video.font_path is not None
    frames = VideoFrames([Image.fromarray(np.full((112, 112, 3), 128, np.uint8))] * 2, [0.0, 61.5])
    a, _, _ = plain.process_video(frames)
    b, _, _ = drawn.process_video(frames)
    assert not torch.equal(a, b)  # the corner text changed the pixels ...
    assert torch.equal(a[-16:], b[-16:])  # ... and only near the top-left corner


def _with_timestamp_font(ckpt: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint's processor files whose video config draws timestamps."""
    font = next(f for f in FONTS if f.is_file())
    folder = tmp_path / "drawn"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ckpt / name, folder / name)
    shutil.copy(font, folder / font.name)
    video = json.loads((ckpt / "video_preprocessor_config.json").read_text())
    video |= {"draw_on_frames": True, "font": font.name}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video))
    return folder


# ---- videos: equal to HF's video processor (where torchvision imports) --------------------------
@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' ERNIE-VL video processor needs torchvision")
@pytest.mark.parametrize("draw", [False, True])
def test_images_and_videos_match_hf_processor(ckpt, tokenizer, hf_config, tmp_path, draw):
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    if draw and not any(f.is_file() for f in FONTS):
        pytest.skip("no TrueType font on this machine")
    folder = _with_timestamp_font(ckpt, tmp_path) if draw else ckpt
    text = f"User: Picture 1:{IMG}Video 1:{VID}Video 2:{VID}Picture 2:{IMG}\nAssistant: "
    imgs = images((90, 60), (60, 150))
    clips = [video_array(5, 80, 64, seed=2), video_array(4, 120, 90, seed=3)]
    fps, indices = 2.0, [[0, 2, 4, 6, 8], [0, 3, 6, 9]]  # as if sampled from 2 fps sources
    ours = make_processor(folder, hf_config)
    videos = [VideoFrames([Image.fromarray(f) for f in clip], [i / fps for i in idx])
              for clip, idx in zip(clips, indices)]
    ids, items = ours.process(tokenizer.encode(text, add_special_tokens=False), imgs, videos)
    hf = AutoProcessor.from_pretrained(str(folder))
    metadata = [VideoMetadata(total_num_frames=10, fps=fps, frames_indices=idx) for idx in indices]
    ref = hf(images=imgs, videos=clips, text=[text], return_tensors="pt", add_special_tokens=False,
             videos_kwargs={"do_sample_frames": False, "video_metadata": metadata})
    assert ids == ref["input_ids"][0].tolist()
    by_kind = {m: [i for i in items if i.modality == m] for m in ("image", "video")}
    assert torch.equal(torch.cat([i.pixels() for i in by_kind["image"]]), ref["pixel_values"])
    assert torch.equal(torch.cat([i.pixels() for i in by_kind["video"]]), ref["pixel_values_videos"])
    assert [i.grid_thw for i in by_kind["image"]] == ref["image_grid_thw"].tolist()
    assert [i.grid_thw for i in by_kind["video"]] == ref["video_grid_thw"].tolist()


# ---- the input processor: offline prompts with multi_modal_data ---------------------------------
def test_input_processor_expands_multi_modal_data(ckpt, tiny_ernie):
    from ernieserve.config import EngineArgs
    from ernieserve.frontend.processor import InputProcessor
    from ernieserve.sampling_params import SamplingParams

    config = EngineArgs(model=str(ckpt), device="cpu", limit_mm_per_prompt={"image": 2, "video": 1},
                        max_model_len=2048).create_engine_config()
    proc = InputProcessor(config.model)
    prompt = {"prompt": f"Picture 1:{IMG}Video 1:{VID} describe",
              "multi_modal_data": {"image": images((60, 60))[0], "video": video_array(2)}}
    _, req = proc.process("r0", prompt, SamplingParams(max_tokens=4))
    assert [i.modality for i in req.mm_items] == ["image", "video"]
    assert len(req.prompt_token_ids) == len(proc.tokenizer.encode(prompt["prompt"])) + sum(
        i.length - 1 for i in req.mm_items)
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        proc.process("r1", {"prompt": "x", "multi_modal_data": {"audio": [1]}}, SamplingParams())
    with pytest.raises(ValueError, match=r"At most 2 image\(s\)"):
        proc.process("r2", {"prompt": IMG * 3, "multi_modal_data": {"image": images((9, 9))*3}}, SamplingParams())
    text_only = InputProcessor(EngineArgs(model=str(tiny_ernie), device="cpu").create_engine_config().model)
    with pytest.raises(ValueError, match="takes no images or videos"):
        text_only.process("r3", prompt, SamplingParams())


def test_full_size_processor_configs_are_transformers_defaults():
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil)

    from ernieserve.checkpoint.presets import get_preset
    from ernieserve.checkpoint.processor_files import processor_configs
    from ernieserve.multimodal.processor import _VIDEO_DEFAULTS

    files = processor_configs(get_preset("ernie-4.5-vl-28b-a3b"))
    image, video = files["preprocessor_config.json"], files["video_preprocessor_config.json"]
    hf = Ernie4_5_VLMoeImageProcessorPil().to_dict()
    for key in ("patch_size", "merge_size", "temporal_patch_size", "do_normalize", "rescale_factor"):
        assert image[key] == hf[key], key
    assert image["size"] == dict(hf["size"])
    assert list(hf["image_mean"]) == image["image_mean"] and list(hf["image_std"]) == image["image_std"]
    assert video["size"] == _VIDEO_DEFAULTS["size"]
    assert (video["min_frames"], video["max_frames"], video["temporal_patch_size"]) == (16, 180, 2)
