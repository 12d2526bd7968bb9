"""block_wise_fp8 (FastDeploy) and fp8 (vLLM): e4m3 weights quantized at load time, activations
quantized on the fly, FP8 tensor-core GEMMs. Hopper (sm90) or newer only.

* block_wise_fp8: one weight scale per 128 x 128 block, one activation scale per token and 128
  input columns (DeepSeek-V3's recipe).
* fp8: one weight scale per output channel, one activation scale per token.

Expected error: e4m3 keeps 3 mantissa bits, so round to nearest is off by at most 2^-4 of a
value (less in the subnormal range near zero); for Gaussian-like values the RMS is about 2.6% of
the RMS value. Weights and activations each contribute that, so a layer's output is off by about
3.7% RMS (measured on N(0, 1) data: 2.6% weights, 3.7% outputs, both schemes).

Off Hopper the schemes are refused. The plain-torch reference (quantize, dequantize, matmul in
fp32) runs anywhere, but only when asked for with
``--quantization-config '{"gemm_backend": "reference"}'``; it exists for tests on CPU.
GEMM backends: auto / triton (the Triton kernels of `ernieserve.kernels.fp8_matmul`), torch
(``torch._scaled_mm`` with row-wise scales; fp8 per channel only), reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ernieserve.kernels import fp8_matmul as f8
from ernieserve.kernels.quant_matmul import GemmBackend
from ernieserve.layers.linear import LinearBase
from ernieserve.layers.quantization.base import QuantConfig, StreamingQuantLinearMethod, UnsupportedQuantization

if TYPE_CHECKING:
    from ernieserve.layers.quantization.moe import QuantizedMoEMethod

HOPPER = (9, 0)


@dataclass(frozen=True, slots=True)
class Fp8Config(QuantConfig):
    block_wise: bool  # True: block_wise_fp8; False: fp8 (per channel)
    backend: GemmBackend = GemmBackend.AUTO

    def __post_init__(self) -> None:
        if self.block_wise and self.backend is GemmBackend.TORCH:
            raise UnsupportedQuantization("gemm_backend torch (torch._scaled_mm) runs fp8 per channel only; "
                                          "block_wise_fp8 uses triton")

    @property
    def name(self) -> str:
        return "block_wise_fp8" if self.block_wise else "fp8"

    def linear_method(self) -> "Fp8LinearMethod":
        return Fp8LinearMethod(self)

    def moe_method(self) -> "QuantizedMoEMethod":
        from ernieserve.layers.quantization.moe import QuantizedMoEMethod  # it imports the MoE layers' kernels
        from ernieserve.layers.moe.fused_moe_quant import ExpertScheme

        scheme = ExpertScheme.BLOCK_FP8 if self.block_wise else ExpertScheme.FP8
        return QuantizedMoEMethod(scheme, 0, self.backend)

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        if self.backend is GemmBackend.REFERENCE:
            return  # explicitly asked for: the plain-torch path runs anywhere (slowly)
        if device.type != "cuda":
            raise UnsupportedQuantization(
                f"not supported on {device.type}: FP8 GEMMs need an NVIDIA Hopper GPU (compute capability "
                "9.0 or newer). For tests, --quantization-config '{\"gemm_backend\": \"reference\"}' runs a "
                "plain-torch reference; use wint8 or wint4 to serve quantized on this machine")
        capability = torch.cuda.get_device_capability(device)
        if capability < HOPPER:
            raise UnsupportedQuantization(
                f"not supported on {torch.cuda.get_device_name(device)} (compute capability "
                f"{capability[0]}.{capability[1]}): FP8 GEMMs need Hopper (9.0) or newer; use wint8 or wint4")
        if self.backend is GemmBackend.TORCH and dtype != torch.bfloat16:
            raise UnsupportedQuantization("gemm_backend torch (torch._scaled_mm, row-wise) needs --dtype bfloat16")

    def describe(self) -> str:
        scales = "128x128 weight blocks, 1x128 activation groups" if self.block_wise else \
            "per-channel weights, per-token activations"
        return f"{self.name} ({scales}, {self.backend.value} GEMM)"


class Fp8LinearMethod(StreamingQuantLinearMethod):
    """Parameters after loading: ``qweight`` e4m3 [N, K] and ``weight_scale`` fp32
    ([ceil(N/128), ceil(K/128)] block-wise, [N, 1] per channel)."""

    def __init__(self, config: Fp8Config) -> None:
        self.config = config

    def quantize(self, layer: LinearBase, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        layer.quant_backend = self.config.backend.resolve(weight.device)
        if self.config.block_wise:
            qweight, scales = f8.quantize_fp8_blockwise(weight)
        else:
            qweight, scales = f8.quantize_fp8_per_channel(weight)
        return {"qweight": qweight, "weight_scale": scales}

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        block_wise = self.config.block_wise
        group = f8.SCALE_BLOCK if block_wise else 0
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        backend = layer.quant_backend
        if backend is GemmBackend.REFERENCE:
            xq, xs = f8.quant_fp8_per_token_group_ref(x2, group)
            y = f8.fp8_matmul_ref(xq, xs, layer.qweight, layer.weight_scale, block_wise, x.dtype, bias)
        else:
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            xq, xs = f8.quant_fp8_per_token_group(x2, group)  # [M, K] e4m3, [M, G] fp32
            if backend is GemmBackend.TORCH:
                y = f8.scaled_mm_per_channel(xq, xs, layer.qweight, layer.weight_scale, x.dtype, bias)
            else:
                tiles = f8.fp8_tiles(xq.shape[0], layer.qweight.shape[0], xq.shape[1], xq.device)
                y = f8.fp8_matmul(xq, xs, layer.qweight, layer.weight_scale, block_wise, x.dtype, bias, tiles)
        return y.view(*x.shape[:-1], -1)
