"""Image/video processor configs for VL checkpoints: what HF's AutoImageProcessor, AutoVideoProcessor
and AutoProcessor read from a model folder, and what ernieserve's multimodal front end reads.

Three files, as transformers' own ``save_pretrained`` lays them out for ERNIE-4.5-VL:

* ``preprocessor_config.json``: ``Ernie4_5_VLMoeImageProcessor`` settings (pixel bounds as
  ``size.shortest_edge`` / ``size.longest_edge`` in pixels, CLIP mean/std, 14-pixel patches merged
  2x2: the vision config's ``patch_size`` and ``spatial_merge_size``);
* ``video_preprocessor_config.json``: ``Ernie4_5_VLMoeVideoProcessor`` settings (its own pixel
  bounds, frame bounds, temporal patch 2 = the vision config's ``temporal_merge_size``);
* ``processor_config.json``: the processor class that ties them to the tokenizer.

Values are transformers' class defaults (those of the released checkpoints) except two things:
``draw_on_frames`` is false, because the real checkpoints' timestamp font (Roboto) is not ours to
ship and a font-less folder fails HF's video processor load; and tiny presets get small pixel and
frame bounds so that a test image becomes a handful of tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ernieserve.checkpoint.presets import Preset

# OpenAI CLIP normalisation, as in transformers' image_utils (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_BICUBIC = 3  # PILImageResampling.BICUBIC
_TOKEN_PIXELS = 28 * 28  # one LLM token = a 2x2 merge of 14x14 patches


def _bounds(preset: Preset) -> dict[str, int]:
    """Pixel and frame bounds: transformers' defaults, or small ones for tiny presets."""
    if preset.name.startswith("tiny"):
        return {"image_min": 4 * _TOKEN_PIXELS, "image_max": 64 * _TOKEN_PIXELS,
                "video_min": 4 * _TOKEN_PIXELS, "video_max": 16 * _TOKEN_PIXELS,
                "min_frames": 2, "max_frames": 8}
    return {"image_min": 56 * 56, "image_max": 6177 * _TOKEN_PIXELS,
            "video_min": 299 * _TOKEN_PIXELS, "video_max": 1196 * _TOKEN_PIXELS,
            "min_frames": 16, "max_frames": 180}


def processor_configs(preset: Preset) -> dict[str, dict[str, Any]]:
    """File name -> JSON contents for a VL preset (its config must have a vision_config)."""
    vision = preset.config["vision_config"]
    patch, merge = int(vision["patch_size"]), int(vision["spatial_merge_size"])
    temporal = int(vision.get("temporal_merge_size", 2))
    bounds = _bounds(preset)
    common = {
        "do_convert_rgb": True, "do_resize": True, "resample": _BICUBIC, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
        "patch_size": patch, "merge_size": merge,
    }  # fmt: skip
    image = common | {
        "image_processor_type": "Ernie4_5_VLMoeImageProcessor",
        "processor_class": "Ernie4_5_VLMoeProcessor",
        "temporal_patch_size": 1,
        "size": {"shortest_edge": bounds["image_min"], "longest_edge": bounds["image_max"]},
    }
    video = common | {
        "video_processor_type": "Ernie4_5_VLMoeVideoProcessor",
        "processor_class": "Ernie4_5_VLMoeProcessor",
        "temporal_patch_size": temporal,
        "size": {"shortest_edge": bounds["video_min"], "longest_edge": bounds["video_max"]},
        "do_sample_frames": True,
        "min_frames": bounds["min_frames"],
        "max_frames": bounds["max_frames"],
        "draw_on_frames": False,
        "return_metadata": False,
    }
    return {
        "preprocessor_config.json": image,
        "video_preprocessor_config.json": video,
        "processor_config.json": {"processor_class": "Ernie4_5_VLMoeProcessor"},
    }


def write_processor_files(preset: Preset, out_dir: str | Path) -> None:
    """Writes the processor configs of a VL preset into its checkpoint folder."""
    out = Path(out_dir)
    for name, payload in processor_configs(preset).items():
        (out / name).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
