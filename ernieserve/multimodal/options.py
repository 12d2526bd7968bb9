"""The multimodal flags, parsed: ``--limit-mm-per-prompt`` and ``--mm-processor-kwargs``.

Both take JSON (a dict from the offline API). Errors are ValueErrors whose message names the flag
and the offending key; `EngineArgs` turns them into ConfigErrors at startup.

``--mm-processor-kwargs`` keys are FastDeploy's names for ERNIE-4.5-VL (``image_min_pixels``,
``video_fps``, ...); the short names that vLLM users pass through to the HF processor
(``min_pixels``, ``fps``, ``min_frames``, ...) are accepted as aliases. Frame sampling follows
FastDeploy: ``video_target_frames`` > 0 takes exactly that many frames; otherwise ``video_fps``
frames per second, clamped into [``video_min_frames``, ``video_max_frames``].
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

MODALITIES = ("image", "video")
# FastDeploy's default when --limit-mm-per-prompt is not given: one image and one video per prompt
# (vLLM's V1 engine defaults to 999 of each; we follow the FastDeploy flag we take).
DEFAULT_LIMIT_MM_PER_PROMPT: dict[str, int] = {"image": 1, "video": 1}
FRAME_SAMPLE_MODES = ("leading", "middle")

_LIMIT_FLAG = "--limit-mm-per-prompt"
_KWARGS_FLAG = "--mm-processor-kwargs"


@dataclass(frozen=True, slots=True)
class MMProcessorOptions:
    """--mm-processor-kwargs. None = the checkpoint's (video_)preprocessor_config.json value."""

    image_min_pixels: int | None = None  # resized images have at least this many pixels
    image_max_pixels: int | None = None  # ... and at most this many
    video_min_pixels: int | None = None  # the same bounds for each video frame
    video_max_pixels: int | None = None
    video_fps: float = 2.0  # frames sampled per second of video (FastDeploy's default)
    video_min_frames: int | None = None  # clamp of the fps-derived frame count
    video_max_frames: int | None = None
    video_target_frames: int = -1  # > 0: exactly this many frames (at most the video's), fps ignored
    video_frames_sample: str = "leading"  # where in each interval a frame is taken: leading | middle
    # Architecture constants FastDeploy lets users restate; checked against the model, never changed.
    spatial_conv_size: int | None = None
    temporal_conv_size: int | None = None


# accepted key -> field of MMProcessorOptions
_ALIASES: dict[str, str] = {f.name: f.name for f in dataclasses.fields(MMProcessorOptions)} | {
    "min_pixels": "image_min_pixels",
    "max_pixels": "image_max_pixels",
    "fps": "video_fps",
    "min_frames": "video_min_frames",
    "max_frames": "video_max_frames",
    "target_frames": "video_target_frames",
    "frames_sample": "video_frames_sample",
}


def _as_dict(value: str | dict[str, Any] | None, flag: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} is not valid JSON ({e}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {type(value).__name__}.")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_limit_mm_per_prompt(value: str | dict[str, Any] | None) -> dict[str, int]:
    """{"image": N, "video": M}; modalities left out keep the default."""
    given = _as_dict(value, _LIMIT_FLAG)
    limits = dict(DEFAULT_LIMIT_MM_PER_PROMPT)
    for key, count in given.items():
        if key not in MODALITIES:
            raise ValueError(f"{_LIMIT_FLAG}: unknown modality {key!r}; ernieserve takes "
                             f"{' and '.join(MODALITIES)}.")
        if not _is_int(count) or count < 0:
            raise ValueError(f"{_LIMIT_FLAG}: {key!r} must be a non-negative integer, got {count!r}.")
        limits[key] = count
    return limits


def parse_mm_processor_kwargs(value: str | dict[str, Any] | None) -> MMProcessorOptions:
    given = _as_dict(value, _KWARGS_FLAG)
    fields: dict[str, Any] = {}
    for key, raw in given.items():
        name = _ALIASES.get(key)
        if name is None:
            raise ValueError(f"{_KWARGS_FLAG}: unknown key {key!r}; known keys: {', '.join(sorted(_ALIASES))}.")
        if name in fields:
            raise ValueError(f"{_KWARGS_FLAG}: {key!r} sets {name} a second time.")
        fields[name] = _checked(key, name, raw)
    options = MMProcessorOptions(**fields)
    _check_order(options.image_min_pixels, options.image_max_pixels, "image_min_pixels", "image_max_pixels")
    _check_order(options.video_min_pixels, options.video_max_pixels, "video_min_pixels", "video_max_pixels")
    _check_order(options.video_min_frames, options.video_max_frames, "video_min_frames", "video_max_frames")
    return options


def _checked(key: str, name: str, raw: Any) -> Any:
    if name == "video_frames_sample":
        if raw not in FRAME_SAMPLE_MODES:
            raise ValueError(f"{_KWARGS_FLAG}: {key!r} must be one of {', '.join(FRAME_SAMPLE_MODES)}, got {raw!r}.")
        return raw
    if name == "video_fps":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw <= 0:
            raise ValueError(f"{_KWARGS_FLAG}: {key!r} must be a positive number, got {raw!r}.")
        return float(raw)
    if name == "video_target_frames":
        # FastDeploy spells "not set" as -1
        if not _is_int(raw) or raw == 0 or raw < -1:
            raise ValueError(f"{_KWARGS_FLAG}: {key!r} must be a positive integer (or -1: unset), got {raw!r}.")
        return raw
    if not _is_int(raw) or raw < 1:
        raise ValueError(f"{_KWARGS_FLAG}: {key!r} must be a positive integer, got {raw!r}.")
    return raw


def _check_order(low: int | None, high: int | None, low_name: str, high_name: str) -> None:
    if low is not None and high is not None and low > high:
        raise ValueError(f"{_KWARGS_FLAG}: {low_name} ({low}) is larger than {high_name} ({high}).")
