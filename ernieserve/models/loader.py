"""Build a model from its config and fill it from a local safetensors checkpoint.

Weights stream shard by shard, tensor by tensor (`safe_open` maps the file; each tensor is read,
copied into its parameter on the target device, and dropped), so peak host memory stays about one
tensor, not the model. `load_format="dummy"` fills parameters with random values straight on the
device from config.json alone, for benchmarks of models we have no weights for.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from ernieserve.attention.base import AttentionBackend
from ernieserve.checkpoint.dummy import dummy_vector_value
from ernieserve.config import ModelConfig
from ernieserve.distributed.parallel_state import SINGLE, TPGroup, expert_parallel_scope
from ernieserve.distributed.sharded_loading import init_dummy_weights_sharded, iterate_checkpoint_mapped
from ernieserve.layers.quantization import is_streaming_quantized, quantization_scope, quantized_share
from ernieserve.models.registry import resolve_model_class

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint file; the message names the file."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e}).") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (listed in {index.name}).")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files found "
                              "(use --load-format dummy for random weights).")
    return files


def iterate_checkpoint(files: list[Path], progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in tqdm(files, desc="Loading safetensors shards", unit="shard", disable=not progress or len(files) < 2):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: cannot be read as safetensors ({e}).") from e
        with handle as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({e}).") from e
                yield name, tensor


def build_model(model_config: ModelConfig, backend: AttentionBackend, device: torch.device,
                tp: TPGroup = SINGLE, expert_parallel: bool = False) -> nn.Module:
    cls = resolve_model_class(getattr(model_config.hf_config, "architectures", None))
    start = time.perf_counter()
    if device.type == "cuda":  # the load's own peak, reported below (quantizing while loading keeps it low)
        torch.cuda.reset_peak_memory_stats(device)
    # Quantized linear layers start as meta tensors and quantize each layer as its last checkpoint
    # shard streams in (layers/quantization/base.py), so the full-precision model is never resident.
    with torch.device(device), quantization_scope(model_config.quant_config), expert_parallel_scope(expert_parallel):
        # multimodal models (takes_full_config) need the vision settings too, not just text_config()
        cfg = model_config.hf_config if getattr(cls, "takes_full_config", False) else model_config.text_config()
        model = cls(cfg, backend, model_config.dtype, tp)
    model.eval()
    model_dir = Path(model_config.model)
    if model_config.load_format == "dummy" and tp.size > 1:
        # the one-rank model's draw, sliced: every tensor-parallel size runs the same random model
        # (in the same expert-parallel scope: it decides whether shared experts fold into the experts)
        with torch.device("meta"), quantization_scope(model_config.quant_config), \
                expert_parallel_scope(expert_parallel):
            full = cls(cfg, backend, model_config.dtype, SINGLE)
        init_dummy_weights_sharded(model, full, model_config.seed, device, is_streaming_quantized)
    elif model_config.load_format == "dummy":
        init_dummy_weights(model, model_config.seed)
    else:
        expected = {n for n, _ in model.named_parameters()}
        files = checkpoint_files(model_dir)
        # a rank keeps slices: mapped views let it copy only those (distributed/sharded_loading.py)
        tensors = iterate_checkpoint_mapped(files) if tp.size > 1 else iterate_checkpoint(files)
        loaded = model.load_weights(tensors)
        missing = sorted(expected - loaded)
        if missing:
            raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}.")
    for module in model.modules():
        method = getattr(module, "method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    log_folded_shared_experts(model)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    quant = model_config.quant_config
    rank = (f" (tensor-parallel rank {tp.rank} of {tp.size}{', expert parallel' if expert_parallel else ''})"
            if tp.size > 1 else "")
    logger.info("Loaded %s (%s) in %.1f s: %.2f GiB of weights in %s%s on %s%s", cls.__name__,
                model_config.load_format, time.perf_counter() - start, nbytes / 2**30, model_config.dtype,
                f", {quantized_share(model):.0%} of weights {quant.describe()}" if quant is not None else "", device,
                rank)
    if device.type == "cuda":
        logger.info("Peak device memory while loading: %.2f GiB (allocated by torch on %s)",
                    torch.cuda.max_memory_allocated(device) / 2**30, device)
    return model


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.is_meta:  # a quantized layer's placeholder: filled below, one layer at a time
            continue
        if p.dim() == 1:
            p.fill_(dummy_vector_value(name, p.numel()))
        else:
            p.normal_(0.0, 0.02, generator=gen)
    for module in model.modules():
        if is_streaming_quantized(module):
            module.method.init_random(module, gen)


def log_folded_shared_experts(model: nn.Module) -> int:
    """Says which MoE layers run their shared experts inside the routed experts' grouped GEMMs
    (layers/moe/layer.py, MoEBlock); returns the number of such layers."""
    from ernieserve.layers.moe.layer import MoEBlock

    folded = [m.num_folded_shared for m in model.modules() if isinstance(m, MoEBlock)]
    layers = sum(1 for n in folded if n)
    if layers:
        logger.info("Shared experts run in the fused MoE kernels as %d more experts per layer (%d layers)",
                    max(folded), layers)
    return layers
