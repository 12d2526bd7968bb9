"""What every online quantization method shares: the config interface, the construction scope
that hands linear layers their method, and quantization while the checkpoint streams.

Streaming: a quantized layer never owns a full-precision weight between tensors. At construction
its `weight` is a meta tensor (shape only, no memory), so building the model allocates nothing
for the linear weights. When the first checkpoint shard for the layer arrives, the method
allocates one full-precision staging tensor for that layer on the target device and lets the
layer's own `weight_loader` (TP slicing, q/k/v or gate/up placement) copy the shard into it. It
counts the shard ids it has seen (q, k, v for QKV; 0, 1 for gate/up; None for the others); when
the last one lands it quantizes the staging tensor into the layer's quantized parameters and
frees it. Peak memory is therefore the quantized model plus one layer's full-precision weight
plus one checkpoint tensor, never the full-precision model. Random (`--load-format dummy`)
weights go through the same path, one layer at a time (`init_random`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from ernieserve.layers.linear import LinearBase, LinearMethod, MergedColumnParallelLinear, QKVParallelLinear

if TYPE_CHECKING:
    from ernieserve.layers.quantization.moe import MoEMethod


class UnsupportedQuantization(ValueError):
    """A quantization method or option that cannot run here; the config layer adds the flag name."""


class QuantConfig(ABC):
    """One online quantization scheme, parsed from --quantization / --quantization-config."""

    @property
    @abstractmethod
    def name(self) -> str: ...

    @abstractmethod
    def linear_method(self) -> LinearMethod: ...

    @abstractmethod
    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise UnsupportedQuantization when this scheme cannot run on `device` with `dtype`."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the load log, e.g. "wint4 (groups of 128, auto GEMM)"."""

    def moe_method(self) -> MoEMethod:
        """The method for FusedMoE's routed experts (layers/quantization/moe.py)."""
        raise UnsupportedQuantization(f"{self.name} does not quantize MoE experts")


# The scheme of the model being built. A context variable, like `with torch.device(...)`, so every
# model family's constructor hands its linear layers the method without each one forwarding it,
# and two engines built in two threads never see each other's.
_BUILDING: contextvars.ContextVar[QuantConfig | None] = contextvars.ContextVar("ernieserve_quant", default=None)


@contextlib.contextmanager
def quantization_scope(config: QuantConfig | None) -> Iterator[None]:
    token = _BUILDING.set(config)
    try:
        yield
    finally:
        _BUILDING.reset(token)


def scoped_linear_method() -> LinearMethod | None:
    """The linear method for a dense projection built inside `quantization_scope` (None: bf16)."""
    config = _BUILDING.get()
    return None if config is None else config.linear_method()


def scoped_quant_config() -> QuantConfig | None:
    """The scheme of the model being built (FusedMoE asks it for its `moe_method()`)."""
    return _BUILDING.get()


# ---- quantization while streaming ------------------------------------------------------------------

@dataclass(slots=True)
class StreamState:
    device: torch.device  # where the quantized weight lives
    dtype: torch.dtype  # the model dtype the checkpoint is cast to before quantizing
    shape: tuple[int, int]  # [out_features, in_features] of this rank's shard
    expected: frozenset[object]  # shard ids that make a full weight
    seen: set[object] = field(default_factory=set)
    staging: torch.Tensor | None = None  # full-precision weight, only while shards arrive
    done: bool = False


def expected_shards(layer: LinearBase) -> frozenset[object]:
    if isinstance(layer, QKVParallelLinear):
        return frozenset({"q", "k", "v"})
    if isinstance(layer, MergedColumnParallelLinear):
        return frozenset(range(len(layer.out_sizes)))
    return frozenset({None})


class StreamingQuantMethod(ABC):
    """What the loader asks of any method that quantizes while the checkpoint streams (the linear
    methods here, the MoE experts' in moe.py)."""

    @abstractmethod
    def init_random(self, layer: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
        """Random weights for --load-format dummy, quantized like loaded ones."""

    @abstractmethod
    def full_precision_numel(self, layer: nn.Module) -> int:
        """Weight elements the layer quantizes (for the load log's quantized share)."""


class StreamingQuantLinearMethod(LinearMethod, StreamingQuantMethod):
    """Base of the quantized linear methods: subclasses say how to quantize and how to multiply."""

    @abstractmethod
    def quantize(self, layer: LinearBase, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full-precision weight [out, in] -> the layer's quantized parameters by name."""

    def create_weights(self, layer: LinearBase, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        target = torch.get_default_device()  # the enclosing `with torch.device(...)`
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device="meta"),
                                    requires_grad=False)
        layer.weight.weight_loader = functools.partial(self._load_shard, layer)  # type: ignore[attr-defined]
        layer.quant_stream = StreamState(target, dtype, (out_features, in_features), expected_shards(layer))

    def _load_shard(self, layer: LinearBase, param: nn.Parameter, loaded: torch.Tensor,
                    shard_id: object = None) -> None:
        state: StreamState = layer.quant_stream
        if state.done:
            raise ValueError("arrived after the layer was complete and quantized (a duplicate tensor?)")
        if state.staging is None:
            state.staging = torch.empty(state.shape, dtype=state.dtype, device=state.device)
        layer.weight_loader(state.staging, loaded, shard_id)  # type: ignore[arg-type]
        state.seen.add(shard_id)
        if state.seen >= state.expected:
            self._finish(layer)

    @torch.no_grad()
    def _finish(self, layer: LinearBase) -> None:
        state: StreamState = layer.quant_stream
        assert state.staging is not None
        quantized = self.quantize(layer, state.staging)
        state.staging = None
        state.done = True
        layer.weight = None  # the meta placeholder; named_parameters() skips it from now on
        for name, tensor in quantized.items():
            layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    @torch.no_grad()
    def init_random(self, layer: LinearBase, generator: torch.Generator, std: float = 0.02) -> None:
        """Random weights for --load-format dummy, quantized like a loaded layer."""
        state: StreamState = layer.quant_stream
        if state.done:
            return
        state.staging = torch.empty(state.shape, dtype=state.dtype, device=state.device).normal_(
            0.0, std, generator=generator)
        self._finish(layer)

    def full_precision_numel(self, layer: LinearBase) -> int:
        out_features, in_features = layer.quant_stream.shape
        return out_features * in_features

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        state: StreamState = layer.quant_stream
        if state.done:
            return
        got = sorted(map(str, state.seen))
        want = sorted(map(str, state.expected))
        raise ValueError(f"{type(layer).__name__} [{state.shape[0]} x {state.shape[1]}] received checkpoint "
                         f"shards {got} of {want}; it cannot be quantized from a partial weight.")


def is_streaming_quantized(module: nn.Module) -> bool:
    return isinstance(getattr(module, "method", None), StreamingQuantMethod)


def quantized_share(model: nn.Module) -> float:
    """The fraction of the model's weight elements that live in quantized layers (linears and MoE
    experts; for the load log: what stays in bf16, e.g. embeddings, LM head and router, is the rest)."""
    quantized = 0
    for module in model.modules():
        if is_streaming_quantized(module):
            quantized += module.method.full_precision_numel(module)  # type: ignore[union-attr]
    # named_parameters counts a tied weight once
    other = sum(p.numel() for name, p in model.named_parameters()
                if not name.endswith(("qweight", "weight_scale")))
    return quantized / max(1, quantized + other)
