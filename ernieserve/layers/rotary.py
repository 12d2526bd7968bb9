"""Rotary position embedding applied to flattened tokens [num_tokens, heads, head_dim].

Two layouts: "neox" rotates the two halves of head_dim (Llama, Qwen); "interleaved" rotates
adjacent pairs (ERNIE 4.5, as HF's Ernie4_5 rotate_half does). The cos/sin table is built once
for max_position and indexed by each token's position.

On CUDA tensors q and k are rotated in place by one Triton launch (`ernieserve.kernels.rotary`);
on CPU, or with ERNIESERVE_DISABLE_TRITON_ELEMENTWISE=1, the plain torch below (the reference)
returns new tensors. Callers use the returned pair and must not rely on the inputs either way.
"""

from __future__ import annotations

import torch
from torch import nn

from ernieserve.layers.norm import load_elementwise_kernel, triton_elementwise_enabled


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def llama3_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling of the inverse frequencies."""
    import math

    inv = default_inv_freq(head_dim, theta)
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_mid, mid, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, interleaved: bool,
                 rope_scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.interleaved = interleaved
        kind = (rope_scaling or {}).get("rope_type", "default")
        if kind == "default":
            inv_freq = default_inv_freq(head_dim, theta)
        elif kind == "llama3":
            inv_freq = llama3_inv_freq(head_dim, theta, rope_scaling or {})
        else:
            raise ValueError(f"rope_type {kind!r} is not supported yet")
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # [max_position, head_dim // 2] each, float32 (kept in float32 for accuracy)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.use_triton = triton_elementwise_enabled()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, Hq, D], k [T, Hkv, D] -> rotated (q, k). May overwrite q and k."""
        if self.use_triton and q.is_cuda and self._kernel_fits(q, k):
            kernels = load_elementwise_kernel("rotary")
            if kernels is not None:
                return kernels.apply_rotary_(positions, q, k, self.cos, self.sin, self.interleaved)
        return self.forward_torch(positions, q, k)

    def kernel_tables(self, positions: torch.Tensor, q: torch.Tensor | None = None, k: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(row per token, cos table, sin table) for a Triton kernel that rotates q and k as
        `forward` would (the attention backend fuses rotation with the KV store), or None where
        `forward` would take the torch path. q and k: the views that kernel rotates (checked for its
        layout), or None for one that computes them itself (the fused qkv GEMV, kernels/gemv.py)."""
        if not (self.use_triton and positions.is_cuda) or positions.dim() != 1:
            return None
        if q is not None and not (q.is_cuda and self._kernel_fits(q, k)):
            return None
        return positions, self.cos, self.sin

    @staticmethod
    def _kernel_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
        # the kernel rotates [T, heads, D] views in place; anything else takes the torch path
        return q.dim() == 3 and k.dim() == 3 and q.stride(-1) == 1 and k.stride(-1) == 1

    def forward_torch(self, positions: torch.Tensor, q: torch.Tensor,
                      k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference: plain torch, any device, new tensors."""
        cos = self.cos[positions].unsqueeze(1)  # [num_tokens, 1, head_dim // 2]
        sin = self.sin[positions].unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)
