"""silu(gate) * up for the fused gate_up projection output.

On CUDA tensors the call is one Triton kernel (`ernieserve.kernels.activation`); on CPU, or with
ERNIESERVE_DISABLE_TRITON_ELEMENTWISE=1, it is the plain torch below, which stays the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from ernieserve.layers.norm import load_elementwise_kernel, triton_elementwise_enabled


class SiluAndMul(nn.Module):
    """silu(x[..., :d]) * x[..., d:] for the fused gate_up projection output [..., 2d]."""

    def __init__(self) -> None:
        super().__init__()
        self.use_triton = triton_elementwise_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton and x.is_cuda:
            kernels = load_elementwise_kernel("activation")
            if kernels is not None:
                return kernels.silu_and_mul(x)
        return self.forward_torch(x)

    @staticmethod
    def forward_torch(x: torch.Tensor) -> torch.Tensor:
        """The reference: plain torch, any device."""
        d = x.shape[-1] // 2
        return nn.functional.silu(x[..., :d]) * x[..., d:]
