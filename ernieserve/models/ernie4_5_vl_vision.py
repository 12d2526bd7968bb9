"""ERNIE 4.5 VL's vision side: the variable-resolution ViT and the spatial + temporal resampler.

As HF transformers' `Ernie4_5_VLMoeVisionTransformerPretrainedModel` and
`Ernie4_5_VLMoeVariableResolutionResamplerModel` define them:

* Vision tower: a linear patch embedding of the processor's flattened 14x14 patches, `depth`
  pre-norm blocks (LayerNorm, bidirectional attention with a 2-D axial rotary, LayerNorm, MLP),
  a final LayerNorm. Attention never crosses a frame: every frame (t index) of every image or
  video is its own sequence. The processor orders each frame's patches block-major over
  ``spatial_merge_size`` x ``spatial_merge_size`` blocks, so the resampler can merge them with a
  reshape.
* Resampler: ``m*m`` neighbouring patches concatenated -> MLP (`spatial_linear`); then pairs of
  frames concatenated (an image is paired with itself) -> MLP (`temporal_linear`); then a linear
  to the text width and an RMSNorm.

Everything runs for a whole batch of images and videos in one pass: frames of the same size
share one attention call, and the index tensors are built per item on the host, never per patch.
These layers stay in the model dtype and are never quantized (`ReplicatedLinear` with no
method); the tower is small next to the experts and is replicated on every tensor-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ernieserve.layers.linear import ReplicatedLinear
from ernieserve.layers.norm import RMSNorm

Grid = tuple[int, int, int]  # (t, h, w) in patches, as the processor's image/video_grid_thw rows


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "silu": nn.functional.silu,
}


def vision_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"vision_config.hidden_act {name!r} is not supported; "
                         f"supported: {', '.join(_ACTIVATIONS)}") from None


# ---- per-batch index plans (host side, one numpy pass per item) ------------------------------

@dataclass(slots=True)
class FrameGroups:
    """Frames of equal patch count, gathered for one attention call each.

    ``rows[i]`` is ``[num_frames_i, frame_len_i]`` int64: the patch rows of every frame of that
    length in the batch.
    """

    rows: list[torch.Tensor]


def frame_groups(grids: list[Grid], device: torch.device) -> FrameGroups:
    lengths = np.concatenate([np.full(t, h * w, dtype=np.int64) for t, h, w in grids])  # [num_frames]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows = []
    for length in np.unique(lengths):
        first = starts[lengths == length]  # [n] first patch row of each frame of this size
        rows.append(torch.from_numpy(first[:, None] + np.arange(length)[None, :]).to(device))
    return FrameGroups(rows)


def patch_positions(grids: list[Grid], merge: int) -> np.ndarray:
    """[num_patches, 2] int64 (h, w) of every patch, block-major over merge x merge blocks."""
    out = []
    for t, h, w in grids:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], axis=-1), (t, 1)))
    return np.concatenate(out)


def temporal_pairs(grids: list[Grid], merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (after spatial merging) of the first and second frame of every output row.

    Frame pairs (0, 1), (2, 3), ... of a video; an image (t == 1) is paired with itself. Rows of
    a frame are ``h * w / merge**2`` consecutive rows.
    """
    first, second = [], []
    offset = 0
    for t, h, w in grids:
        size = h * w // (merge * merge)
        even = np.arange(0, t, 2)
        odd = np.arange(1, t, 2) if t > 1 else even
        cols = np.arange(size)
        first.append((offset + even[:, None] * size + cols[None, :]).reshape(-1))
        second.append((offset + odd[:, None] * size + cols[None, :]).reshape(-1))
        offset += t * size
    return np.concatenate(first), np.concatenate(second)


# ---- vision tower ----------------------------------------------------------------------------

class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = ReplicatedLinear(dim, 3 * dim, bias=True, dtype=dtype)
        self.proj = ReplicatedLinear(dim, dim, bias=True, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: FrameGroups) -> torch.Tensor:
        """x [N, dim]; cos/sin [N, head_dim] float32 -> [N, dim]."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [N, heads, head_dim] each
        q, k = _rotate_neox(q, cos, sin), _rotate_neox(k, cos, sin)
        out = torch.empty_like(q)
        for rows in groups.rows:  # one call per distinct frame size: [frames, heads, len, head_dim]
            qg, kg, vg = (t[rows].transpose(1, 2) for t in (q, k, v))
            og = nn.functional.scaled_dot_product_attention(qg, kg, vg)
            out[rows.reshape(-1)] = og.transpose(1, 2).reshape(-1, self.num_heads, self.head_dim)
        return self.proj(out.reshape(n, -1))


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-halves rotary in float32 (as HF's vision rotary): x [N, heads, D], cos/sin [N, D]."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc1 = ReplicatedLinear(dim, hidden, bias=True, dtype=dtype)
        self.fc2 = ReplicatedLinear(hidden, dim, bias=True, dtype=dtype)
        self.act = vision_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads, dtype)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: FrameGroups) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_features: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = ReplicatedLinear(in_features, dim, bias=False, dtype=dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.to(self.proj.weight.dtype))


class VisionTransformer(nn.Module):
    """pixels [num_patches, in_channels * patch**2] + grids -> [num_patches, vision hidden]."""

    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__()
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        self.patch_features = cfg.in_channels * patch * patch
        self.merge = cfg.spatial_merge_size
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ValueError(f"vision_config: hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must be a "
                             "head size divisible by 4 (the 2-D rotary splits it into h and w halves)")
        self.patch_embed = PatchEmbed(self.patch_features, cfg.hidden_size, dtype)
        self.blocks = nn.ModuleList(VisionBlock(cfg, dtype) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        # Axial rotary: head_dim / 4 frequencies over a base of head_dim / 2, used once for h and
        # once for w (HF's `compute_axial_rope_parameters`)
        half = cfg.hidden_size // cfg.num_heads // 2
        theta = float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary_tables(self, grids: list[Grid], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [num_patches, head_dim] float32: angles (h * f, w * f), repeated for both halves."""
        pos = torch.from_numpy(patch_positions(grids, self.merge)).to(device)  # [N, 2]
        angles = (pos[:, :, None].float() * self.inv_freq).flatten(1)  # [N, head_dim / 2]: h part, w part
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        x = self.patch_embed(pixels)  # [N, hidden]
        cos, sin = self.rotary_tables(grids, x.device)
        groups = frame_groups(grids, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, groups)
        return self.ln(x)


# ---- resampler -------------------------------------------------------------------------------

class ResamplerMLP(nn.Module):
    """Linear -> exact GELU -> Linear -> LayerNorm (checkpoint indices 0, 2, 3 = fc1, fc2, ln)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc1 = ReplicatedLinear(in_dim, out_dim, bias=True, dtype=dtype)
        self.fc2 = ReplicatedLinear(out_dim, out_dim, bias=True, dtype=dtype)
        self.ln = nn.LayerNorm(out_dim, eps=eps, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.fc2(nn.functional.gelu(self.fc1(x))))


class Resampler(nn.Module):
    """[num_patches, vision hidden] -> [num_tokens, text hidden]: one row per placeholder token."""

    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__()
        vision, text = cfg.vision_config, cfg.text_config
        if vision.temporal_merge_size != 2:  # HF's temporal slicing pairs frames and nothing else
            raise ValueError(f"vision_config.temporal_merge_size must be 2, got {vision.temporal_merge_size}")
        self.merge = vision.spatial_merge_size
        spatial_dim = vision.hidden_size * self.merge ** 2
        self.spatial_linear = ResamplerMLP(spatial_dim, spatial_dim, vision.rms_norm_eps, dtype)
        self.temporal_linear = ResamplerMLP(2 * spatial_dim, spatial_dim, vision.rms_norm_eps, dtype)
        self.mlp = ReplicatedLinear(spatial_dim, text.hidden_size, bias=True, dtype=dtype)
        self.after_norm = RMSNorm(text.hidden_size, text.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        x = self.spatial_linear(x.reshape(-1, x.shape[-1] * self.merge ** 2))  # [N / m^2, spatial_dim]
        first, second = (torch.from_numpy(i).to(x.device) for i in temporal_pairs(grids, self.merge))
        x = self.temporal_linear(torch.cat([x[first], x[second]], dim=-1))  # [tokens, spatial_dim]
        return self.after_norm(self.mlp(x))
