"""RMSNorm, with the residual add fused into the same call.

On CUDA tensors the call is one Triton kernel (`ernieserve.kernels.fused_norm`); on CPU, or with
ERNIESERVE_DISABLE_TRITON_ELEMENTWISE=1, it is the plain torch below, which stays the reference.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch
from torch import nn

DISABLE_ENV = "ERNIESERVE_DISABLE_TRITON_ELEMENTWISE"


def triton_elementwise_enabled() -> bool:
    """Whether the elementwise layers (norm, rotary, activation) may use their Triton kernels.

    Looks for triton without importing it: the first import fixes interpreter vs compiled mode
    for the whole process, so it waits until a CUDA tensor actually needs a kernel.
    """
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return False
    return importlib.util.find_spec("triton") is not None


@functools.cache
def load_elementwise_kernel(module: str) -> ModuleType | None:
    """Import ernieserve.kernels.<module> once; None if triton fails to import (torch path then)."""
    try:
        return importlib.import_module(f"ernieserve.kernels.{module}")
    except ImportError:
        return None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.use_triton = triton_elementwise_enabled()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual).

        With a residual [tokens, hidden], x may be [tokens, slots, hidden]: partial sums added up
        first (x.sum(dim=1)), as a MoE layer returns its per-slot expert outputs (layers/moe/layer.py)."""
        if self.use_triton and x.is_cuda and (residual is None or residual.dtype == x.dtype):
            kernels = load_elementwise_kernel("fused_norm")
            if kernels is not None:
                return kernels.rms_norm(x, self.weight, self.eps, residual)
        return self.forward_torch(x, residual)

    def forward_torch(self, x: torch.Tensor,
                      residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The reference: plain torch, any device."""
        if residual is not None and x.dim() == residual.dim() + 1:
            x = x.sum(dim=1)  # slot partials: fp32 accumulation, one rounding
        if residual is not None:
            x = x + residual
            residual = x
        orig = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # Matches HF: cast back to the input dtype before scaling by the weight.
        out = self.weight * xf.to(orig)
        return out if residual is None else (out, residual)
