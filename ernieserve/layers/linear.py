"""Tensor-parallel linear layers with pluggable quantization methods.

Column-parallel layers split the output features across ranks, row-parallel layers split the
input features and all-reduce. Each parameter carries a `weight_loader` that knows which slice of
a full checkpoint tensor belongs to this rank (and, for fused layers, which sub-matrix it fills),
so the checkpoint loader never needs to know about sharding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ernieserve.distributed.parallel_state import SINGLE, TPGroup

if TYPE_CHECKING:
    from ernieserve.attention.base import RopeKVStore

WeightLoader = Callable[..., None]


class LinearMethod(ABC):
    """How a linear layer stores and applies its weight (plain, int8, int4, fp8 ...)."""

    @abstractmethod
    def create_weights(self, layer: "LinearBase", in_features: int, out_features: int, dtype: torch.dtype) -> None: ...

    @abstractmethod
    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        """Hook for methods that repack or quantize once the full weight is loaded."""

    def apply_qkv_rope(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None,
                       store: "RopeKVStore") -> torch.Tensor | None:
        """A qkv projection whose kernel also rotates q and k and stores k and v in the KV cache
        (`QKVParallelLinear.forward_rope_store`): rotated q, or None where this method has no such
        kernel for this call (the default)."""
        return None


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: "LinearBase", in_features: int, out_features: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        layer.weight.weight_loader = layer.weight_loader  # type: ignore[attr-defined]

    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            from ernieserve.kernels import gemv  # Triton; imported on CUDA only

            if gemv.use_gemv(x, layer.weight):  # decode rows with PDL: the weight read overlaps
                return gemv.gemv(x, layer.weight, bias)
        return nn.functional.linear(x, layer.weight, bias)

    def apply_qkv_rope(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None,
                       store: "RopeKVStore") -> torch.Tensor | None:
        from ernieserve.kernels import gemv  # Triton; only asked when a Triton backend fuses rotary

        if not gemv.use_gemv(x, layer.weight):  # where `apply` takes the GEMV: one row on CUDA, PDL on
            return None
        return gemv.gemv_rope_store(x, layer.weight, bias, *store)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d}).")
    return n // d


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, tp: TPGroup,
                 method: LinearMethod | None) -> None:
        super().__init__()
        self.tp = tp
        self.in_features = in_features  # this rank's shard
        self.out_features = out_features
        self.method = method or UnquantizedLinearMethod()
        self.method.create_weights(self, in_features, out_features, dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.bias = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        raise NotImplementedError


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 tp: TPGroup = SINGLE, method: LinearMethod | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, tp, method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        _copy(param.data, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's rows (output features) split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 tp: TPGroup = SINGLE, method: LinearMethod | None = None) -> None:
        super().__init__(in_features, _divide(out_features, tp.size, "output features"), bias, dtype, tp, method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        n = param.shape[0]
        _copy(param.data, loaded.narrow(0, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate_proj + up_proj)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, dtype: torch.dtype = torch.float32,
                 tp: TPGroup = SINGLE, method: LinearMethod | None = None) -> None:
        self.out_sizes = [_divide(s, tp.size, "output features") for s in out_sizes]
        super().__init__(in_features, sum(out_sizes), bias, dtype, tp, method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int), "merged linear needs the index of the sub-projection"
        size = self.out_sizes[shard_id]
        offset = sum(self.out_sizes[:shard_id])
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; KV heads are replicated when there are fewer than ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: TPGroup = SINGLE, method: LinearMethod | None = None) -> None:
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp.size, "attention heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = _divide(num_kv_heads, tp.size, "key/value heads")
            self.kv_replicas = 1
        else:  # fewer KV heads than ranks: each KV head is replicated on tp / num_kv_heads ranks
            self.num_kv_heads = 1
            self.kv_replicas = tp.size // num_kv_heads
            if tp.size % num_kv_heads:
                raise ValueError(f"the tensor-parallel size ({tp.size}) is not a multiple of the key/value "
                                 f"heads ({num_kv_heads}), so they cannot be replicated evenly.")
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden_size, out, bias, dtype, tp, method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[str(shard_id)]
        rank = self.tp.rank if shard_id == "q" else self.tp.rank // self.kv_replicas
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, rank * size, size))

    def forward_rope_store(self, x: torch.Tensor, store: "RopeKVStore") -> torch.Tensor | None:
        """The projection, rotary and KV store in one kernel: q [num_tokens, heads * head_dim]
        rotated, this step's k (rotated) and v already written into store's cache. None, with
        nothing done, where the method has no such kernel for this call (`forward`, then rotate and
        store as usual)."""
        return self.method.apply_qkv_rope(self, x, self.bias, store)


class RowParallelLinear(LinearBase):
    """y = x W^T with W's columns (input features) split across ranks, then all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 tp: TPGroup = SINGLE, method: LinearMethod | None = None) -> None:
        super().__init__(_divide(in_features, tp.size, "input features"), out_features, bias, dtype, tp, method)
        # False when the caller sums this output with another partial one first and reduces once
        # (a MoE block's shared experts and routed experts: one all-reduce instead of two)
        self.reduce_results = True

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            _copy(param.data, loaded)
            return
        n = param.shape[1]
        _copy(param.data, loaded.narrow(1, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp.rank == 0 else None  # added once: only rank 0's partial sum carries it
        out = self.method.apply(self, x, bias)
        return self.tp.all_reduce(out) if self.reduce_results else out


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(src.shape)}, the model expects {tuple(dst.shape)}")
    dst.copy_(src)
