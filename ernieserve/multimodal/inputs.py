"""What the front end hands the engine for one image or video of a prompt.

The front end (media loading + the model's HF image/video processor) expands each image or video
into a run of placeholder tokens in ``prompt_token_ids`` and sends one `MultiModalItem` per run:
where the run is, how long it is, and the processed pixels. The engine core runs the vision
encoder when the run is first scheduled and splices its output rows into the token embeddings;
`hash` identifies the content (encoder cache key, prefix-cache extra key).

Items cross the ZMQ socket as msgspec structs, so tensors travel as raw bytes plus dtype and shape.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "uint8": torch.uint8, "int64": torch.int64}


class MultiModalItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    modality: str  # "image" | "video"
    offset: int  # index in prompt_token_ids of the first placeholder token of this item
    length: int  # number of placeholder tokens = rows the encoder produces for it
    hash: str  # hex digest of the processed pixels and grid
    grid_thw: list[int]  # [t, h, w] in patches, as the HF processor's image/video_grid_thw row
    pixel_values: bytes = b""  # the HF processor's pixel_values rows of this item, raw
    dtype: str = "float32"
    shape: list[int] = []

    def pixels(self) -> torch.Tensor:
        """The processed pixels as a tensor of `shape` (a copy: the bytes stay immutable)."""
        if self.dtype == "bfloat16":
            raw = np.frombuffer(self.pixel_values, dtype=np.int16).copy()
            return torch.from_numpy(raw).view(torch.bfloat16).reshape(self.shape)
        return torch.from_numpy(np.frombuffer(self.pixel_values, dtype=self.dtype).copy()).reshape(self.shape)

    @classmethod
    def from_pixels(cls, modality: str, offset: int, length: int, grid_thw: list[int],
                    pixels: torch.Tensor) -> "MultiModalItem":
        t = pixels.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            raw, dtype = t.view(torch.int16).numpy().tobytes(), "bfloat16"
        else:
            raw, dtype = t.numpy().tobytes(), str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported pixel dtype {dtype}")
        digest = hashlib.sha256()
        digest.update(modality.encode())
        digest.update(np.asarray(grid_thw, dtype=np.int64).tobytes())
        digest.update(raw)
        return cls(modality=modality, offset=offset, length=length, hash=digest.hexdigest(),
                   grid_thw=[int(v) for v in grid_thw], pixel_values=raw, dtype=dtype, shape=list(t.shape))

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class VisionTokenIds:
    """A VL checkpoint's placeholder and bracket token ids (config.json's *_token_id)."""

    image: int
    image_start: int
    image_end: int
    video: int
    video_start: int
    video_end: int

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "VisionTokenIds":
        names = ("image", "image_start", "image_end", "video", "video_start", "video_end")
        ids = {n: getattr(hf_config, f"{n}_token_id", None) for n in names}
        missing = [f"{n}_token_id" for n, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}; cannot place images and videos.")
        return cls(**{n: int(v) for n, v in ids.items()})
