"""ERNIE-4.5-VL's multimodal front end: prompt token ids + images/videos -> the prompt the engine
runs (each image/video marker expanded into its run of placeholder tokens) + one `MultiModalItem`
per image/video.

The result is exactly what transformers' ``Ernie4_5_VLMoeProcessor`` produces for the same text
and media: ``<|IMAGE_PLACEHOLDER|>`` repeated ``t*h*w / merge**2`` times per image (videos:
``<|VIDEO_PLACEHOLDER|>``, also divided by the temporal patch size 2), between the start/end
markers the chat template wrote, and the item's rows of ``pixel_values`` /
``pixel_values_videos`` with its ``image_grid_thw`` / ``video_grid_thw`` row. Images go through
transformers' own image processor (``AutoImageProcessor``: the torchvision backend where
torchvision imports, the PIL one otherwise), with the checkpoint's settings and
``--mm-processor-kwargs`` on top.

Video: how the engine and CI get it, and why
--------------------------------------------
transformers' ``Ernie4_5_VLMoeVideoProcessor`` imports torchvision at module level, and there is
no torchvision for the CPU torch that CI and the developers' machines run (2.13); making the
engine depend on it would drop video everywhere but on the GPU machine. So we do not call it.
We decode and sample frames ourselves (`media.decode_video`, PyAV, FastDeploy's sampling rules),
then reproduce that processor's per-video work from parts that exist everywhere:

1. draw each frame's timestamp in its corner when the checkpoint's video config asks for it
   (``draw_on_frames``, with the font file it names: same text, size, position and colours as
   transformers draws);
2. repeat the last frame when the count is odd (temporal patches are 2 frames);
3. resize, rescale, normalise and patchify every frame with the *image* processor, called with
   the video config's pixel bounds, mean/std and resampling and ``temporal_patch_size=1``.

Step 3 is exact, not an approximation: for one frame, the video processor's patch layout
``[grid_h/m, grid_w/m, m, m, C, p, p]`` is the image processor's with a temporal patch of 1, and
both resize with the same call. Frame t's rows are therefore rows ``t*h*w ... (t+1)*h*w`` of
``pixel_values_videos``, and ``video_grid_thw`` is ``[frames, h, w]``.
tests/multimodal/test_processor.py checks this against the real HF video processor where
torchvision imports (with and without timestamp drawing); CI runs everything else. The one
difference left is the backend: without torchvision, frames (like images) are resized by PIL
instead of torchvision, within one intensity level - the same difference transformers itself has
between its two image-processor backends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ernieserve.multimodal.inputs import MultiModalItem, VisionTokenIds
from ernieserve.multimodal.media import FrameSampling, VideoFrames
from ernieserve.multimodal.options import DEFAULT_LIMIT_MM_PER_PROMPT, MMProcessorOptions

logger = logging.getLogger(__name__)

ImageInput = Image.Image | np.ndarray
VideoInput = VideoFrames | np.ndarray | Sequence[Image.Image | np.ndarray]

_SUPPORTED_MODEL_TYPES = ("ernie4_5_vl_moe",)
# transformers' Ernie4_5_VLMoeVideoProcessor defaults, for a checkpoint without a video config
_VIDEO_DEFAULTS: dict[str, Any] = {
    "size": {"shortest_edge": 299 * 28 * 28, "longest_edge": 1196 * 28 * 28}, "temporal_patch_size": 2,
    "min_frames": 16, "max_frames": 180, "draw_on_frames": True, "font": "Roboto-Regular.ttf",
}  # fmt: skip
# video config keys handed to the image processor when it processes frames
_FRAME_KWARGS = ("do_convert_rgb", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
                 "image_mean", "image_std")
_TIMESTAMP_SIZE = 0.1  # font size as a fraction of the frame's short side; outline as one of the font's


@dataclass(frozen=True, slots=True)
class VideoSettings:
    """What the checkpoint's video_preprocessor_config.json says, with --mm-processor-kwargs on top."""

    min_pixels: int
    max_pixels: int
    temporal_patch_size: int
    sampling: FrameSampling
    font_path: str | None  # set when timestamps are drawn on frames
    frame_kwargs: dict[str, Any] = field(default_factory=dict)


class MultiModalProcessor:
    """Expands image/video markers in token ids and turns media into `MultiModalItem`s."""

    def __init__(self, tokens: VisionTokenIds, image_processor: Any, video: VideoSettings,
                 options: MMProcessorOptions = MMProcessorOptions(),
                 limit_per_prompt: dict[str, int] | None = None) -> None:
        self.tokens = tokens
        self.image_processor = image_processor
        self.video = video
        self.limit_per_prompt = dict(limit_per_prompt or DEFAULT_LIMIT_MM_PER_PROMPT)
        self.merge_size = int(image_processor.merge_size)
        self.patch_size = int(image_processor.patch_size)
        self.image_kwargs: dict[str, Any] = {"temporal_patch_size": 1}
        size = image_processor.size
        if options.image_min_pixels is not None or options.image_max_pixels is not None:
            self.image_kwargs["size"] = {
                "shortest_edge": options.image_min_pixels or size["shortest_edge"],
                "longest_edge": options.image_max_pixels or size["longest_edge"],
            }
        if options.spatial_conv_size not in (None, self.merge_size):
            raise ValueError(f"--mm-processor-kwargs: spatial_conv_size {options.spatial_conv_size} does not match "
                             f"the model's merge size {self.merge_size}.")
        if options.temporal_conv_size not in (None, video.temporal_patch_size):
            raise ValueError(f"--mm-processor-kwargs: temporal_conv_size {options.temporal_conv_size} does not "
                             f"match the model's temporal patch size {video.temporal_patch_size}.")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, hf_config: Any, options: MMProcessorOptions = MMProcessorOptions(),
                        limit_per_prompt: dict[str, int] | None = None) -> "MultiModalProcessor":
        """The processor of the checkpoint in ``model_dir`` (its preprocessor configs and config.json)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(f"no multimodal front end for model_type {model_type!r} (supported: "
                             f"{', '.join(_SUPPORTED_MODEL_TYPES)}).")
        folder = Path(model_dir)
        if not (folder / "preprocessor_config.json").is_file() and not (folder / "processor_config.json").is_file():
            raise ValueError(f"{folder}: no preprocessor_config.json; the image processor settings of a VL model "
                             "are needed to take images and videos.")
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(str(folder))
        video = _video_settings(folder, options)
        return cls(VisionTokenIds.from_hf_config(hf_config), image_processor, video, options, limit_per_prompt)

    # ---- the public entry point ----------------------------------------------------------------
    def check_limits(self, num_images: int, num_videos: int) -> None:
        for modality, count in (("image", num_images), ("video", num_videos)):
            limit = self.limit_per_prompt.get(modality, 0)
            if count > limit:
                raise ValueError(f"At most {limit} {modality}(s) per prompt are accepted (--limit-mm-per-prompt "
                                 f"{modality}={limit}); this prompt has {count}.")

    def process(self, prompt_token_ids: list[int], images: Sequence[ImageInput] = (),
                videos: Sequence[VideoInput] = ()) -> tuple[list[int], list[MultiModalItem]]:
        """Expanded ids and the items, in prompt order. ``prompt_token_ids`` holds one image
        (video) placeholder token per image (video), in the order the media are given."""
        self.check_limits(len(images), len(videos))
        ids = list(prompt_token_ids)
        found = {"image": ids.count(self.tokens.image), "video": ids.count(self.tokens.video)}
        for modality, given in (("image", len(images)), ("video", len(videos))):
            if found[modality] != given:
                raise ValueError(f"The prompt has {found[modality]} {modality} placeholder(s) but {given} "
                                 f"{modality}(s) were given; each {modality} needs exactly one placeholder.")
        if not images and not videos:
            return ids, []
        processed = {"image": self.process_images(images), "video": [self.process_video(v) for v in videos]}
        return self._expand(ids, processed)

    # ---- images --------------------------------------------------------------------------------
    def process_images(self, images: Sequence[ImageInput]) -> list[tuple[torch.Tensor, list[int], int]]:
        """(pixel rows [h*w, C*p*p], grid [1, h, w], placeholder count) per image."""
        if not images:
            return []
        pil = [_as_image(img, f"image {i}") for i, img in enumerate(images)]
        try:
            out = self.image_processor(images=pil, return_tensors="pt", **self.image_kwargs)
        except ValueError as e:  # e.g. an aspect ratio over 200
            raise ValueError(f"an image cannot be processed: {e}") from None
        rows, grids = out["pixel_values"], out["image_grid_thw"].tolist()
        result, start = [], 0
        for grid in grids:
            count = int(np.prod(grid))
            result.append((rows[start:start + count], grid, count // self.merge_size**2))
            start += count
        return result

    # ---- videos --------------------------------------------------------------------------------
    def process_video(self, video: VideoInput) -> tuple[torch.Tensor, list[int], int]:
        """(pixel rows [T*h*w, C*p*p], grid [T, h, w], placeholder count) of one video."""
        frames = self._as_video_frames(video)
        images = list(frames.frames)
        if self.video.font_path is not None:
            images = [_draw_timestamp(img, ts, self.video.font_path) for img, ts in zip(images, frames.timestamps)]
        if len(images) % self.video.temporal_patch_size:
            images.append(images[-1])  # as transformers: an odd last frame is repeated
        size = {"shortest_edge": self.video.min_pixels, "longest_edge": self.video.max_pixels}
        try:
            out = self.image_processor(images=images, return_tensors="pt", size=size,
                                       **self.video.frame_kwargs, temporal_patch_size=1)
        except ValueError as e:
            raise ValueError(f"a video cannot be processed: {e}") from None
        grids = out["image_grid_thw"]  # [frames, 3], every row [1, h, w]
        grid = [len(images), int(grids[0, 1]), int(grids[0, 2])]
        tokens = int(np.prod(grid)) // (self.merge_size**2 * self.video.temporal_patch_size)
        return out["pixel_values"], grid, tokens

    def _as_video_frames(self, video: VideoInput) -> VideoFrames:
        if isinstance(video, VideoFrames):
            if not video.frames:
                raise ValueError("a video has no frames.")
            return video
        if isinstance(video, np.ndarray):
            if video.ndim != 4 or video.shape[-1] != 3:
                raise ValueError(f"a video array must be [frames, height, width, 3] RGB, got shape {video.shape}.")
            frames = [Image.fromarray(np.ascontiguousarray(f).astype(np.uint8)) for f in video]
        else:
            frames = [_as_image(f, f"video frame {i}") for i, f in enumerate(video)]
        if not frames:
            raise ValueError("a video has no frames.")
        # Frames given as such are taken as already sampled, at --mm-processor-kwargs video_fps.
        fps = self.video.sampling.fps
        return VideoFrames(frames, [i / fps for i in range(len(frames))])

    # ---- placeholders --------------------------------------------------------------------------
    def _expand(self, ids: list[int], processed: dict[str, list[tuple[torch.Tensor, list[int], int]]]
                ) -> tuple[list[int], list[MultiModalItem]]:
        marker = {self.tokens.image: "image", self.tokens.video: "video"}
        taken = {"image": 0, "video": 0}
        out: list[int] = []
        items: list[MultiModalItem] = []
        for token in ids:
            modality = marker.get(token)
            if modality is None:
                out.append(token)
                continue
            pixels, grid, count = processed[modality][taken[modality]]
            taken[modality] += 1
            items.append(MultiModalItem.from_pixels(modality, len(out), count, grid, pixels))
            out.extend([token] * count)
        return out, items


# ---- helpers ------------------------------------------------------------------------------------
def _as_image(value: ImageInput, name: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[-1] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(value).astype(np.uint8)).convert("RGB")
    raise ValueError(f"{name} must be a PIL image or an [height, width, 3] uint8 array, got {type(value).__name__}.")


def _timestamp_text(seconds: float) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"time: {int(hours):02d}:{int(minutes):02d}:{secs:05.02f}"


def _draw_timestamp(frame: Image.Image, seconds: float, font_path: str) -> Image.Image:
    """The frame with its timestamp in the top-left corner, drawn as transformers draws it."""
    font_size = int(min(frame.size) * _TIMESTAMP_SIZE)
    if font_size < 1:
        return frame  # too small to carry text (transformers cannot draw on it either)
    image = frame.copy()
    font = ImageFont.truetype(font_path, font_size)
    ImageDraw.Draw(image).text((0, 0), _timestamp_text(seconds), font=font, fill=(0, 0, 0),
                               stroke_width=int(font_size * _TIMESTAMP_SIZE), stroke_fill=(255, 255, 255))
    return image


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e


def _video_settings(folder: Path, options: MMProcessorOptions) -> VideoSettings:
    """The checkpoint's video config (processor_config.json's nested one first, as transformers),
    with the options on top."""
    nested = (_read_json(folder / "processor_config.json") or {}).get("video_processor")
    config = _VIDEO_DEFAULTS | (nested or _read_json(folder / "video_preprocessor_config.json") or {})
    size = config["size"]
    font_path = None
    if config.get("draw_on_frames"):
        candidate = folder / str(config.get("font"))
        if candidate.is_file():
            font_path = str(candidate)
        else:
            logger.warning("%s: the video config draws timestamps on frames with the font %r, which the folder "
                           "lacks; frames are processed without timestamps.", folder, config.get("font"))
    sampling = FrameSampling(
        fps=options.video_fps,
        min_frames=options.video_min_frames or int(config["min_frames"]),
        max_frames=options.video_max_frames or int(config["max_frames"]),
        target_frames=options.video_target_frames,
        frames_sample=options.video_frames_sample,
    )
    if sampling.min_frames > sampling.max_frames:
        raise ValueError(f"--mm-processor-kwargs: video_min_frames ({sampling.min_frames}) is larger than "
                         f"video_max_frames ({sampling.max_frames}).")
    return VideoSettings(
        min_pixels=options.video_min_pixels or int(size["shortest_edge"]),
        max_pixels=options.video_max_pixels or int(size["longest_edge"]),
        temporal_patch_size=int(config["temporal_patch_size"]),
        sampling=sampling, font_path=font_path,
        frame_kwargs={k: config[k] for k in _FRAME_KWARGS if k in config},
    )
