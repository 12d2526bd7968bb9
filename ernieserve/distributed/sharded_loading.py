"""Weights of one tensor-parallel rank: checkpoint tensors read as memory-mapped views, and
random (`--load-format dummy`) weights that are the same model whatever the rank count.

Reading: a rank keeps only its slice of each tensor, and the layers' weight loaders narrow the
full checkpoint tensor to that slice. `iterate_checkpoint_mapped` hands them zero-copy views of the
memory-mapped safetensors file, so a rank copies (and the page cache reads) only the slices it
keeps, never the whole tensor and never the whole model; the loaders work unchanged.

Dummy weights: `init_dummy_weights` of models/loader.py draws each parameter of the model at hand
from one generator, in parameter order. A rank's parameters are slices, so drawing them directly
would give every tensor-parallel size a different model. `init_dummy_weights_sharded` replays the
one-rank draw instead: it walks a one-rank twin of the model built on the meta device (no memory),
draws each full tensor exactly as one rank would (same generator, order and shapes) on this rank's
device, and hands it to this rank's weight loaders as if it came from a checkpoint. TP=N with
dummy weights therefore computes the same function as TP=1, which the GPU benchmarks check.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ernieserve.checkpoint.dummy import dummy_vector_value
from ernieserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointFormatError(ValueError):
    """A safetensors file whose header cannot be read; the message names the file."""


def iterate_checkpoint_mapped(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the safetensors files, each a view of the mapped file.

    The mapping is private (copy-on-write), so views are writable and nothing is ever written back;
    it lives as long as a view of it does.
    """
    for path in files:
        with open(path, "rb") as f:
            try:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError as e:  # an empty file
                raise CheckpointFormatError(f"{path}: cannot be read as safetensors ({e}).") from e
        header, data_start = _read_header(path, mapped)
        for name in sorted(k for k in header if k != "__metadata__"):
            yield name, _view(path, mapped, data_start, name, header[name])


def _read_header(path: Path, mapped: mmap.mmap) -> tuple[dict, int]:
    """safetensors layout: u64 little-endian header length, the JSON header, then the data."""
    if len(mapped) < 8:
        raise CheckpointFormatError(f"{path}: too short to be a safetensors file.")
    length = int.from_bytes(mapped[:8], "little")
    if length > len(mapped) - 8:
        raise CheckpointFormatError(f"{path}: header length {length} exceeds the file.")
    try:
        header = json.loads(mapped[8:8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: the safetensors header is not valid JSON ({e}).") from e
    return header, 8 + length


def _view(path: Path, mapped: mmap.mmap, data_start: int, name: str, info: dict) -> torch.Tensor:
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype", ""))
    if dtype is None:
        raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
    shape = list(info["shape"])
    begin, end = info["data_offsets"]
    itemsize = torch.tensor([], dtype=dtype).element_size()
    count = (end - begin) // itemsize
    if count != _numel(shape) or data_start + end > len(mapped):
        raise CheckpointFormatError(f"{path}: tensor {name!r} has inconsistent offsets for shape {shape}.")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin).view(shape)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- dummy weights, the same for every tensor-parallel size ----------------------------------------

@torch.no_grad()
def init_dummy_weights_sharded(model: nn.Module, full_model: nn.Module, seed: int, device: torch.device,
                               is_quantized: Callable[[nn.Module], bool]) -> None:
    """Fill `model` (this rank's) with its slices of the random model that one rank would draw.

    full_model: the same class built for one rank on the meta device (shapes only), with the same
    --enable-expert-parallel setting (it decides whether shared experts fold into the routed
    ones, and so the order of the draws: compare dummy models of equal settings). is_quantized:
    whether a module streams its weights into quantized storage (linear layers, MoE experts); like
    `init_dummy_weights`, those are drawn after every other parameter, module by module.
    """
    from ernieserve.layers.moe.layer import FusedMoE

    gen = torch.Generator(device=device).manual_seed(seed)
    params = dict(model.named_parameters())
    full_modules = dict(full_model.named_modules())
    for name, full in full_model.named_parameters():
        if params[name].is_meta:
            continue  # a quantized placeholder: drawn below, as the one-rank model does
        owner = full_modules.get(name.rpartition(".")[0])
        if full.dim() == 1:
            value = torch.full(full.shape, dummy_vector_value(name, full.numel()), dtype=full.dtype, device=device)
        else:
            value = torch.empty(full.shape, dtype=full.dtype, device=device).normal_(0.0, 0.02, generator=gen)
        _load_full(params[name], value, owner)
        del value
    sharded_modules = dict(model.named_modules())
    for name, full_module in full_modules.items():
        if not is_quantized(full_module):
            continue
        layer = sharded_modules[name]
        if isinstance(full_module, FusedMoE):
            _draw_experts(full_module, layer, gen, device)
            continue
        out_features, in_features = full_module.quant_stream.shape
        value = torch.empty(out_features, in_features, dtype=layer.quant_stream.dtype, device=device)
        value.normal_(0.0, 0.02, generator=gen)
        _load_full(layer.weight, value, full_module, loader=layer.weight.weight_loader)


def _draw_experts(full: nn.Module, layer: nn.Module, gen: torch.Generator, device: torch.device) -> None:
    """Quantized experts: one projection at a time, in the one-rank order (expert, gate/up/down),
    each handed to this rank's per-expert loader (which keeps its experts and rows)."""
    num_experts, inter, hidden = full.w13.shape[0], full.inter, full.w13.shape[2]
    for e in range(num_experts):
        for proj in ("gate", "up", "down"):
            shape = (hidden, inter) if proj == "down" else (inter, hidden)
            rows = torch.empty(shape, dtype=full.w13.dtype, device=device).normal_(0.0, 0.02, generator=gen)
            layer.weight_loader(layer.w2 if proj == "down" else layer.w13, rows, (e, proj))


def _load_full(param: nn.Parameter, value: torch.Tensor, full_owner: nn.Module | None,
               loader: Callable[..., None] | None = None) -> None:
    """Hand a full (one-rank) parameter value to this rank's loader, split into the checkpoint's
    pieces where our layer fuses several (q/k/v, gate/up)."""
    loader = loader or getattr(param, "weight_loader", None)
    if loader is None:  # replicated: norms, routers
        param.data.copy_(value)
        return
    if isinstance(full_owner, QKVParallelLinear):
        q = full_owner.num_heads * full_owner.head_dim
        kv = full_owner.num_kv_heads * full_owner.head_dim
        for shard_id, part in zip(("q", "k", "v"), value.split([q, kv, kv], dim=0)):
            loader(param, part, shard_id)
    elif isinstance(full_owner, MergedColumnParallelLinear):
        for shard_id, part in enumerate(value.split(full_owner.out_sizes, dim=0)):
            loader(param, part, shard_id)
    else:
        loader(param, value, None)
