"""How `FusedMoE` stores, loads and runs its routed experts: the `MoEMethod` plug point (the MoE
counterpart of `LinearMethod`), the bf16 method, and the quantized one behind
``--quantization wint8 | wint4 | fp8 | block_wise_fp8``.

The layer keeps what every method shares (expert parallel ranges, TP narrowing of each checkpoint
tensor, the filled-slot bookkeeping) and hands the method one expert projection at a time:
``load_expert(layer, local_expert, "gate" | "up" | "down", rows)`` with this rank's slice
(gate / up ``[I_local, H]``, down ``[H, I_local]``).

Streaming (quantized): construction allocates only the quantized storage (`QuantizedExperts`) and
meta placeholders ``w13`` / ``w2`` (shape only: the loader matches checkpoint names against them).
Each arriving projection is cast to the model dtype on the target device, quantized at once
(rows are independent; fp8 blocks never straddle gate and up, see fused_moe_quant.py) and
written into its expert's slot; no full-precision stacked tensor ever exists. When the last
projection of ``w13`` (or ``w2``) lands, the quantized tensors become the layer's parameters
``w13_qweight``, ``w13_weight_scale`` (``w2_...``) and the placeholder is dropped. Peak memory is the
quantized model plus one checkpoint tensor and its fp32 quantization temporaries.

Prefill: every layer of a model gets the same `DequantScratch` (the quantization config owns it),
into which batches from `fused_moe_quant.DEQUANT_MIN_TOKENS` tokens on (group-wise wint4 only)
dequantize their experts before the bf16 kernels; one buffer of one layer's w13 in the model dtype
(~1 GB at the 21B-A3B shape), allocated by the engine's profiling prefill when that path runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ernieserve.kernels.quant_matmul import GemmBackend
from ernieserve.layers.moe import fused_moe as fm
from ernieserve.layers.moe import fused_moe_quant as fmq
from ernieserve.layers.moe.fused_moe_quant import DequantScratch, ExpertScheme, QuantizedExperts
from ernieserve.layers.quantization.base import StreamingQuantMethod, scoped_quant_config

if TYPE_CHECKING:
    from ernieserve.layers.moe.layer import FusedMoE

# which stacked parameter each checkpoint projection fills
_PARAM_OF = {"gate": "w13", "up": "w13", "down": "w2"}


class MoEMethod(ABC):
    """How a FusedMoE layer stores, loads and applies its experts."""

    @abstractmethod
    def create_weights(self, layer: FusedMoE, num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> None:
        """num_experts: this rank's experts; inter: this rank's intermediate size."""

    @abstractmethod
    def load_expert(self, layer: FusedMoE, expert: int, proj: str, rows: torch.Tensor) -> None:
        """Store this rank's slice of one projection of local expert `expert`."""

    @abstractmethod
    def apply(self, layer: FusedMoE, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, sum_slots: bool = True,
              alignment: fm.Alignment | None = None) -> torch.Tensor:
        """x [T, H], routing [T, top_k] (ids of other ranks' experts = num_experts) -> [T, H].

        sum_slots=False lets the method return its weighted per-slot outputs [T, top_k, H] unsummed
        where it has them (the caller's next RMSNorm adds them up: layers/moe/layer.py); [T, H] is
        always a valid answer.
        alignment: moe_align's outputs for topk_ids, made by the router (fused_moe.triton_route_align)
        at the block_m `align_block_m` answered; given only where that was not None."""

    def align_block_m(self, layer: FusedMoE, num_tokens: int, num_slots: int) -> int | None:
        """The block_m the grouped GEMMs will align T tokens of num_slots ids each for, if they run
        the Triton kernels of fused_moe.py / fused_moe_quant.py that take a precomputed alignment
        (the caller has checked the device); None: they align themselves."""
        return None

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        """Hook called by the loader once the checkpoint has streamed past."""


def scoped_moe_method() -> MoEMethod:
    """The method for a FusedMoE built now: quantized inside `quantization_scope(config)`."""
    config = scoped_quant_config()
    return UnquantizedMoEMethod() if config is None else config.moe_method()


# ---- bf16 (the model dtype) ----------------------------------------------------------------------

class UnquantizedMoEMethod(MoEMethod):
    """``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` in the model dtype."""

    def create_weights(self, layer: FusedMoE, num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> None:
        layer.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=dtype), requires_grad=False)
        layer.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=dtype), requires_grad=False)
        layer.w13.weight_loader = layer.weight_loader  # type: ignore[attr-defined]
        layer.w2.weight_loader = layer.weight_loader  # type: ignore[attr-defined]

    def load_expert(self, layer: FusedMoE, expert: int, proj: str, rows: torch.Tensor) -> None:
        if proj == "down":
            dst = layer.w2.data[expert]  # [H, I]
        else:
            dst = layer.w13.data[expert].narrow(0, 0 if proj == "gate" else layer.inter, layer.inter)  # [I, H]
        _check_shape(rows, tuple(dst.shape))
        dst.copy_(rows)

    def apply(self, layer: FusedMoE, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, sum_slots: bool = True,
              alignment: fm.Alignment | None = None) -> torch.Tensor:
        if x.is_cuda:
            return fm.fused_moe_triton(x, layer.w13, layer.w2, topk_weights, topk_ids,
                                       foreign_experts=layer.expert_parallel, sum_slots=sum_slots,
                                       alignment=alignment, shared_slots=layer.shared_slots)
        return fm.fused_moe_ref(x, layer.w13, layer.w2, topk_weights, topk_ids)

    def align_block_m(self, layer: FusedMoE, num_tokens: int, num_slots: int) -> int | None:
        if not fm.HAS_TRITON:
            return None
        return fm.choose_tile_config(num_tokens * num_slots, layer.w13.shape[0]).block_m  # fused_moe_triton's


# ---- quantized ----------------------------------------------------------------------------------

@dataclass(slots=True)
class ExpertQuantState:
    """A quantized layer's storage and what has arrived of it."""

    experts: QuantizedExperts
    dtype: torch.dtype  # the model dtype: checkpoint slices are cast to it before quantizing
    triton: bool  # run the fused Triton kernels (else the plain-torch reference)
    scratch: DequantScratch | None = None  # the model's shared prefill buffer (fused_moe_quant.py)
    seen: dict[str, set[tuple[int, str]]] = field(default_factory=lambda: {"w13": set(), "w2": set()})
    done: set[str] = field(default_factory=set)


class QuantizedMoEMethod(MoEMethod, StreamingQuantMethod):
    """Experts quantized while the checkpoint streams; layout and kernels in fused_moe_quant.py.

    GEMM backends: ``reference`` runs the plain-torch path anywhere; ``auto``, ``triton`` and
    ``torch`` run the fused Triton kernels on CUDA (torch has no grouped quantized GEMM, so the
    linears' ``torch`` choice falls back to Triton for the experts) and the reference elsewhere.
    """

    def __init__(self, scheme: ExpertScheme, group_size: int, backend: GemmBackend,
                 scratch: DequantScratch | None = None) -> None:
        self.scheme = scheme
        self.group_size = group_size
        self.backend = backend
        # one per model (the config hands the same one to every layer); None: prefill stays fused
        self.scratch = scratch

    def create_weights(self, layer: FusedMoE, num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> None:
        device = torch.get_default_device()  # the loader's `with torch.device(...)`
        # placeholders: the loader matches checkpoint names against them; no memory
        layer.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=dtype, device="meta"),
                                 requires_grad=False)
        layer.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=dtype, device="meta"),
                                requires_grad=False)
        layer.w13.weight_loader = layer.weight_loader  # type: ignore[attr-defined]
        layer.w2.weight_loader = layer.weight_loader  # type: ignore[attr-defined]
        experts = QuantizedExperts.empty(self.scheme, self.group_size, num_experts, hidden, inter, device)
        use_triton = self.backend is not GemmBackend.REFERENCE and device.type == "cuda" and fm.HAS_TRITON
        layer.expert_quant = ExpertQuantState(experts, dtype, use_triton, self.scratch)

    @torch.no_grad()
    def load_expert(self, layer: FusedMoE, expert: int, proj: str, rows: torch.Tensor) -> None:
        state: ExpertQuantState = layer.expert_quant
        experts = state.experts
        expected = (experts.hidden, experts.inter) if proj == "down" else (experts.inter, experts.hidden)
        _check_shape(rows, expected)
        # [R, K] in the model dtype on the target device, as the bf16 path's copy_ would hold it
        rows = rows.to(device=experts.w13.device, dtype=state.dtype)
        q, scales = fmq.quantize_rows(rows, self.scheme, self.group_size)
        experts.store(expert, proj, q, scales)
        param = _PARAM_OF[proj]
        state.seen[param].add((expert, proj))
        per_expert = 2 if param == "w13" else 1
        if param not in state.done and len(state.seen[param]) == per_expert * experts.num_experts:
            self._finish(layer, param)

    def _finish(self, layer: FusedMoE, param: str) -> None:
        """All experts of `param` are in: the quantized tensors replace the meta placeholder."""
        state: ExpertQuantState = layer.expert_quant
        qweight, scale = (state.experts.w13, state.experts.w13_scale) if param == "w13" else \
            (state.experts.w2, state.experts.w2_scale)
        setattr(layer, param, None)  # named_parameters() skips it from now on
        layer.register_parameter(f"{param}_qweight", nn.Parameter(qweight, requires_grad=False))
        layer.register_parameter(f"{param}_weight_scale", nn.Parameter(scale, requires_grad=False))
        state.done.add(param)

    @torch.no_grad()
    def init_random(self, layer: FusedMoE, generator: torch.Generator, std: float = 0.02) -> None:
        """Random weights for --load-format dummy, quantized projection by projection like a checkpoint."""
        state: ExpertQuantState = layer.expert_quant
        experts = state.experts
        device = experts.w13.device
        for e in range(experts.num_experts):
            for proj in ("gate", "up", "down"):
                if (e, proj) in state.seen[_PARAM_OF[proj]]:
                    continue
                shape = (experts.hidden, experts.inter) if proj == "down" else (experts.inter, experts.hidden)
                rows = torch.empty(shape, dtype=state.dtype, device=device).normal_(0.0, std, generator=generator)
                self.load_expert(layer, e, proj, rows)

    def full_precision_numel(self, layer: FusedMoE) -> int:
        experts = layer.expert_quant.experts
        return 3 * experts.num_experts * experts.inter * experts.hidden

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        state: ExpertQuantState = layer.expert_quant
        if state.done == {"w13", "w2"}:
            return
        experts = state.experts
        missing = [f"{e}.{p}" for e in range(experts.num_experts) for p in ("gate", "up", "down")
                   if (e, p) not in state.seen[_PARAM_OF[p]]]
        raise ValueError(f"FusedMoE [{experts.num_experts} experts] lacks {len(missing)} expert projections "
                         f"(e.g. {missing[:3]}); they cannot be quantized from a partial checkpoint.")

    def apply(self, layer: FusedMoE, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, sum_slots: bool = True,
              alignment: fm.Alignment | None = None) -> torch.Tensor:
        state: ExpertQuantState = layer.expert_quant
        if state.triton:
            # prefill-sized batches of wint4 take the dequant path (one pass into the shared
            # scratch, then the bf16 kernels); decode streams the quantized weights (fused_moe_quant.py)
            return fmq.fused_moe_quant_triton(x, state.experts, topk_weights, topk_ids,
                                              foreign_experts=layer.expert_parallel, scratch=state.scratch,
                                              sum_slots=sum_slots, alignment=alignment,
                                              shared_slots=layer.shared_slots)
        return fmq.fused_moe_quant_ref(x, state.experts, topk_weights, topk_ids)

    def align_block_m(self, layer: FusedMoE, num_tokens: int, num_slots: int) -> int | None:
        state: ExpertQuantState = layer.expert_quant
        experts = state.experts
        if not state.triton:
            return None
        # FUSED (choose_quant_tiles) and DEQUANT both align at choose_tile_config's block_m
        return fm.choose_tile_config(num_tokens * num_slots, experts.num_experts).block_m


def _check_shape(rows: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(rows.shape) != expected:
        raise ValueError(f"checkpoint tensor has shape {tuple(rows.shape)}, the model expects {expected}")
