"""wint8 / wint4: weight-only integer quantization of the dense linear layers, done at load time.

Symmetric, no zero point: ``W[n, k] ~= q[n, k] * scale[n, g]`` with ``scale = amax / qmax`` over
the group (qmax 127 for int8, 7 for int4). Per output channel by default (one group per row);
group-wise with ``--quantization-config '{"group_size": 128}'`` (a power of two >= 32; the last
group of a row may be partial). int4 packs two values per byte (layout in
`ernieserve.kernels.quant_matmul`). Activations, the KV cache, embeddings, norms, the router
and the LM head stay in the model dtype.

Expected error (round to nearest, uniform rounding error): each weight is off by at most
scale / 2, with RMS ``scale / sqrt(12) = amax / (qmax * sqrt(12))``. For Gaussian-like rows,
amax is about 3.3 sigma at K = 1024 and 3.6 sigma at K = 4096 (2.6 sigma over groups of 128),
so the relative RMS weight error is about 0.8% for int8, 14-15% for per-channel int4 and 11%
for int4 in groups of 128. A layer's output error has the same relative size (independent
rounding errors average over K as the signal does). Measured on N(0, 1) weights: int8 0.79% /
0.87% (K = 1024 / 4096), int4 14.3% / 15.8%, int4 group 128 11.7%; tests/layers/
test_quantization.py checks these bounds.

GEMM backends (``"gemm_backend"``): auto (Triton on CUDA, the plain-torch reference on CPU),
triton, torch (``torch._weight_int8pack_mm`` / ``_weight_int4pack_mm``; int8 per-channel only,
int4 CUDA bf16 with K % 1024 == 0), reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ernieserve.kernels import quant_matmul as qm
from ernieserve.kernels.quant_matmul import GemmBackend
from ernieserve.layers.linear import LinearBase
from ernieserve.layers.quantization.base import QuantConfig, StreamingQuantLinearMethod, UnsupportedQuantization

if TYPE_CHECKING:
    from ernieserve.attention.base import RopeKVStore
    from ernieserve.layers.moe.fused_moe_quant import DequantScratch
    from ernieserve.layers.quantization.moe import QuantizedMoEMethod


def _new_moe_scratch() -> DequantScratch:
    from ernieserve.layers.moe.fused_moe_quant import DequantScratch  # it imports the MoE kernels

    return DequantScratch()


@dataclass(frozen=True, slots=True)
class WeightOnlyConfig(QuantConfig):
    bits: int  # 8 or 4
    group_size: int = 0  # 0: one scale per output channel
    backend: GemmBackend = GemmBackend.AUTO
    # the routed experts' prefill buffer of dequantized weights: one per model, shared by every MoE
    # layer built with this config (layers/moe/fused_moe_quant.py); not part of the config's value
    moe_scratch: DequantScratch = field(default_factory=_new_moe_scratch, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UnsupportedQuantization(f"weight-only quantization takes 4 or 8 bits, not {self.bits}")
        g = self.group_size
        if g and (g < 32 or g & (g - 1)):
            raise UnsupportedQuantization(f"group_size must be a power of two of at least 32 (or 0 / -1 for "
                                          f"one scale per output channel), got {g}")
        if self.backend is GemmBackend.TORCH and self.bits == 8 and g:
            raise UnsupportedQuantization("gemm_backend torch runs wint8 per channel only (torch's int8pack "
                                          "GEMM has no groups); drop group_size or use triton")

    @property
    def name(self) -> str:
        return f"wint{self.bits}"

    def linear_method(self) -> "WeightOnlyLinearMethod":
        return WeightOnlyLinearMethod(self)

    def moe_method(self) -> "QuantizedMoEMethod":
        from ernieserve.layers.quantization.moe import QuantizedMoEMethod  # it imports the MoE layers' kernels
        from ernieserve.layers.moe.fused_moe_quant import ExpertScheme

        scheme = ExpertScheme.WINT8 if self.bits == 8 else ExpertScheme.WINT4
        return QuantizedMoEMethod(scheme, self.group_size, self.backend, self.moe_scratch)

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        if self.backend is GemmBackend.TRITON and (device.type != "cuda" or not qm.HAS_TRITON):
            raise UnsupportedQuantization("gemm_backend triton needs a CUDA device and triton; on CPU the "
                                          "reference GEMM runs (gemm_backend auto or reference)")
        if self.backend is GemmBackend.TORCH and self.bits == 4 and device.type == "cuda" and dtype != torch.bfloat16:
            raise UnsupportedQuantization("gemm_backend torch runs wint4 in bfloat16 only (--dtype bfloat16)")

    def describe(self) -> str:
        groups = f"groups of {self.group_size}" if self.group_size else "per output channel"
        return f"{self.name} ({groups}, {self.backend.value} GEMM)"


class WeightOnlyLinearMethod(StreamingQuantLinearMethod):
    """Parameters after loading: ``qweight`` (int8 [N, K] or uint8 [N, ceil(K/2)]) and
    ``weight_scale`` fp32 [N, G]; with the torch int4 backend, ``qweight`` is tinygemm's packing and
    ``weight_scale`` its scales-and-zeros [K/G, N, 2]."""

    def __init__(self, config: WeightOnlyConfig) -> None:
        self.config = config

    def quantize(self, layer: LinearBase, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        quantize = qm.quantize_int8 if cfg.bits == 8 else qm.quantize_int4
        qweight, scales = quantize(weight, cfg.group_size)
        backend = cfg.backend.resolve(weight.device)
        layer.quant_backend = backend
        if backend is GemmBackend.TORCH and cfg.bits == 4:
            packed, scales_and_zeros, group = qm.to_int4pack(qweight, scales, weight.shape[1], cfg.group_size,
                                                             weight.dtype)
            layer.int4pack_group = group
            return {"qweight": packed, "weight_scale": scales_and_zeros}
        return {"qweight": qweight, "weight_scale": scales}

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        backend = layer.quant_backend
        if backend is GemmBackend.TRITON:
            if x.is_cuda and cfg.group_size == 0:
                from ernieserve.kernels import gemv  # Triton; imported on CUDA only

                if gemv.use_gemv_quant(x, layer.qweight, layer.weight_scale, cfg.bits):  # one row, PDL on
                    return gemv.gemv_quant(x, layer.qweight, layer.weight_scale, cfg.bits, bias)
            return qm.weight_only_matmul(x, layer.qweight, layer.weight_scale, cfg.bits, cfg.group_size, bias)
        if backend is GemmBackend.TORCH:
            if cfg.bits == 8:
                return qm.int8pack_matmul(x, layer.qweight, layer.weight_scale, bias)
            return qm.int4pack_matmul(x, layer.qweight, layer.weight_scale, layer.int4pack_group, bias)
        return qm.weight_only_matmul_ref(x, layer.qweight, layer.weight_scale, cfg.bits, cfg.group_size, bias)

    def apply_qkv_rope(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None,
                       store: RopeKVStore) -> torch.Tensor | None:
        cfg = self.config
        if layer.quant_backend is not GemmBackend.TRITON or cfg.group_size:
            return None
        from ernieserve.kernels import gemv  # Triton; only asked when a Triton backend fuses rotary

        if not gemv.use_gemv_quant(x, layer.qweight, layer.weight_scale, cfg.bits):  # as `apply`: one row, PDL on
            return None
        return gemv.gemv_quant_rope_store(x, layer.qweight, layer.weight_scale, cfg.bits, bias, *store)
