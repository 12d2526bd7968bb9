"""ERNIE 4.5 VL's 3-D rotary embedding: each rotated pair follows one of the (t, h, w) positions.

Positions come as ``[3, num_tokens]`` rows (temporal, height, width), as HF's `get_rope_index`
builds them; a text token has the same value in all three rows. The layout is ERNIE's
interleaved one (pair j = dims (2j, 2j + 1)) with the usual frequencies
``inv_freq[j] = theta ** (-2j / head_dim)``; what is 3-D is which position row drives each pair.
HF's `Ernie4_5_VLMoeTextRotaryEmbedding` pre-permutes its frequencies and re-interleaves the
angles; undone, with ``mrope_section = [s_h, s_w, s_t]`` (s_h == s_w, sum = head_dim / 2):

* pairs j < s_h + s_w: the height row for even j, the width row for odd j;
* pairs j >= s_h + s_w (the last s_t, the lowest frequencies): the temporal row.

So one standard cos/sin table serves, indexed per pair by that pair's row. With all three rows
equal (text, generated tokens) this is exactly the 1-D interleaved rotary of ERNIE 4.5.
"""

from __future__ import annotations

import torch

from ernieserve.layers.norm import load_elementwise_kernel
from ernieserve.layers.rotary import RotaryEmbedding


def mrope_pair_axes(head_dim: int, mrope_section: list[int]) -> torch.Tensor:
    """[head_dim // 2] int64: the position row (0 = t, 1 = h, 2 = w) of each rotated pair."""
    if len(mrope_section) != 3 or sum(mrope_section) != head_dim // 2:
        raise ValueError(f"rope_parameters.mrope_section {mrope_section} must be 3 numbers summing to "
                         f"head_dim / 2 = {head_dim // 2}")
    s_h, s_w, _ = mrope_section
    if s_h != s_w:  # HF interleaves the h and w angles pairwise, which needs equal parts
        raise ValueError(f"rope_parameters.mrope_section {mrope_section}: the height and width parts must be equal")
    pair = torch.arange(head_dim // 2)
    return torch.where(pair < s_h + s_w, 1 + pair % 2, torch.zeros_like(pair))


class ErnieMRotaryEmbedding(RotaryEmbedding):
    """`RotaryEmbedding` (interleaved) whose `forward` takes positions ``[3, num_tokens]``."""

    def __init__(self, head_dim: int, max_position: int, theta: float, mrope_section: list[int]) -> None:
        super().__init__(head_dim, max_position, theta, interleaved=True)
        self.register_buffer("pair_axes", mrope_pair_axes(head_dim, mrope_section), persistent=False)
        self.register_buffer("pair_index", torch.arange(head_dim // 2), persistent=False)

    def token_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] -> (cos, sin), each [T, head_dim // 2] float32, one row per token."""
        if positions.dim() != 2 or positions.shape[0] != 3:
            raise ValueError(f"positions must be [3, num_tokens] (t, h, w rows), got {tuple(positions.shape)}")
        # [T, D/2]: each pair's own position; contiguous, so the gathered tables are too (the
        # Triton kernel needs rows of stride 1)
        rows = positions.t().index_select(1, self.pair_axes)
        return self.cos[rows, self.pair_index], self.sin[rows, self.pair_index]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T]; q [T, Hq, D], k [T, Hkv, D] -> rotated (q, k). May overwrite q and k."""
        cos, sin = self.token_tables(positions)
        if self.use_triton and q.is_cuda and self._kernel_fits(q, k):
            kernels = load_elementwise_kernel("rotary")
            if kernels is not None:
                # the kernel reads table row positions[t] for token t: per-token tables, row t
                rows = torch.arange(q.shape[0], device=q.device)
                return kernels.apply_rotary_(rows, q, k, cos, sin, True)
        return self._rotate_by_tables(q, k, cos, sin)

    def kernel_tables(self, positions: torch.Tensor, q: torch.Tensor | None = None, k: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Per-token tables: token t reads row t (see `forward`). q, k as in RotaryEmbedding's."""
        if not (self.use_triton and positions.is_cuda):
            return None
        if q is not None and not (q.is_cuda and self._kernel_fits(q, k)):
            return None
        cos, sin = self.token_tables(positions)
        return torch.arange(positions.shape[-1], device=positions.device), cos, sin

    def forward_torch(self, positions: torch.Tensor, q: torch.Tensor,
                      k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference: plain torch, any device, new tensors."""
        return self._rotate_by_tables(q, k, *self.token_tables(positions))

    def _rotate_by_tables(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D/2], broadcast over heads
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
