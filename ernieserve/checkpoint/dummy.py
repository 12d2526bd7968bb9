"""Writes random-weight checkpoints in exactly the Hugging Face layout of a preset.

Names, shapes and dtypes come from transformers itself: the preset's HF class is built on the
``meta`` device and its state dict is passed through transformers' own save-time conversion
(``revert_weight_conversion``), so MoE experts are written per expert
(``mlp.experts.N.gate_proj.weight``) and ERNIE-VL in its original hub layout (``vision_model``,
``mlp.gate.weight_1``, ``moe_statics``), exactly as the real checkpoints store them. Router
weights that the HF class keeps in float32 are written in float32. Each tensor is generated on
its own (from a generator seeded by ``seed`` and the tensor's name, so values do not depend on
sharding) and written shard by shard: peak host memory is about one shard.

Initialisation, and why logits come out peaked
----------------------------------------------
A plain normal(0, 0.02) model with hidden 64 has sublayer outputs of ~0.16x their input, so the
residual stream is mostly the input embedding: attention barely matters, logits have std ~0.16
(near-uniform, ties in bf16) and, with tied embeddings, the argmax is mostly the input token
itself (62-78% of positions in our tiny tied presets).
Greedy parity tests on such a model would prove little and flip on ties. So:

* embeddings and an untied lm_head: normal(0, 0.02), as HF initialises them;
* every other matrix: normal(0, 1/sqrt(fan_in)) -- the same as 0.02 at the real widths (1/32 at
  1024) but variance-preserving at any width, so each sublayer adds an O(1) update, attention
  scores have std ~1 (context-dependent, not uniform) and routers pick experts decisively;
* the final norm (``model.norm.weight``) is ``FINAL_LOGIT_STD / (0.02 * sqrt(hidden))``
  (50 at hidden 64, 12.5 at 1024), so logits have std ~``FINAL_LOGIT_STD`` = 8: the top-1 token
  typically leads the runner-up by about a logit and carries much of the probability mass,
  while hidden states stay O(1) and the largest logits ~40, finite in bf16 and fp16;
* other norm weights are 1 + normal(0, 0.1), biases normal(0, 0.1), ERNIE's expert-selection
  bias (``e_score_correction_bias``) normal(0, 0.05): all non-trivial on purpose, so that an
  engine that drops a bias, a norm weight or the selection bias fails the parity tests instead
  of passing them by luck.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ernieserve.checkpoint.presets import Preset, get_preset
from ernieserve.checkpoint.processor_files import write_processor_files
from ernieserve.checkpoint.tokenizer_builder import build_tokenizer

DEFAULT_PRESET = "ernie-4.5-0.3b"
DEFAULT_MAX_SHARD_BYTES = 512 * 1024**2
FINAL_LOGIT_STD = 8.0
EMBED_STD = 0.02
NORM_JITTER = 0.1
BIAS_STD = 0.1
SELECTION_BIAS_STD = 0.05
_CHUNK_ELEMENTS = 1 << 24  # generate big tensors in ~64 MB float32 slices
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def dummy_vector_value(name: str, numel: int) -> float:
    """The constant a 1-D parameter of a `--load-format dummy` model holds: 0 for biases, 1 for norm
    weights, except the final norm, which scales the N(0, 0.02) model's near-flat logits to a std
    of about FINAL_LOGIT_STD, as `make-dummy` checkpoints do (checkpoint/dummy.py says why):
    greedy comparisons (graphs vs eager, TP=2 vs TP=1) then test the engine, not bf16 ties."""
    if name == "model.norm.weight":
        return FINAL_LOGIT_STD / (0.02 * math.sqrt(numel))
    return 1.0 if "norm" in name else 0.0


class Init(enum.Enum):
    NORMAL = "normal"  # normal(0, scale)
    ONES = "ones"  # scale * (1 + normal(0, NORM_JITTER))


@dataclass(slots=True, frozen=True)
class TensorSpec:
    """One tensor of the on-disk checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: Init
    scale: float

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def checkpoint_tensors(preset: str | Preset, dtype: str = "bfloat16") -> list[TensorSpec]:
    """Every tensor the HF checkpoint of ``preset`` holds, in file order, without any data.

    Works for config-only presets too (the model is built on the meta device), which lets
    loader tests check name mapping for models too big to write.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    torch_dtype = _torch_dtype(dtype)
    model = _meta_model(preset, torch_dtype)
    hidden = int(preset.text_config["hidden_size"])
    specs = []
    for name, tensor in _on_disk_state(model).items():
        # The HF class keeps router weights in float32 whatever the model dtype; so do we.
        keep_fp32 = tensor.dtype == torch.float32 and torch_dtype != torch.float32
        init, scale = _init_rule(name, tuple(tensor.shape), hidden)
        spec_dtype = torch.float32 if keep_fp32 else torch_dtype
        specs.append(TensorSpec(name, tuple(tensor.shape), spec_dtype, init, scale))
    return specs


def write_dummy_checkpoint(
    preset: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    max_shard_bytes: int | None = None,
) -> Path:
    """Writes config, generation config, sharded safetensors and tokenizer into ``out_dir``.

    Config-only presets (``Preset.weights`` False) get no weight files. Weighted presets always
    get at least two shards so that sharded loading is exercised.
    """
    spec = get_preset(preset)
    _torch_dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_weights(out)
    config = spec.config | {"torch_dtype": dtype, "dtype": dtype}
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", spec.generation_config)
    build_tokenizer(spec.tokenizer, spec.vocab_size, out, model_max_length=spec.max_position_embeddings)
    if "vision_config" in spec.config:
        write_processor_files(spec, out)  # image/video processor configs of VL models
    if spec.weights:
        _write_weights(checkpoint_tensors(spec, dtype), out, seed=seed, max_shard_bytes=max_shard_bytes)
    return out


def default_model_dir() -> Path:
    """Where the built-in default model lives: ``$ERNIESERVE_CACHE_DIR/models/<preset>``,
    with ``~/.cache/ernieserve`` when the variable is unset."""
    base = os.environ.get("ERNIESERVE_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "ernieserve"
    return root / "models" / DEFAULT_PRESET


def ensure_default_model() -> Path:
    """The default model's folder, writing it first if it does not exist yet.

    The checkpoint is written into a temporary sibling folder and renamed into place, so an
    interrupted run never leaves a half-written model where the engine would look for it, and
    two processes racing here both end up with the same complete folder.
    """
    final = default_model_dir()
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_dummy_checkpoint(DEFAULT_PRESET, tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- model layout


def _torch_dtype(dtype: str) -> torch.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; choose from {', '.join(_DTYPES)}") from None


def _meta_model(preset: Preset, dtype: torch.dtype) -> torch.nn.Module:
    # Imported here: transformers' auto classes take seconds to import and only this needs them.
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    hf_config = CONFIG_MAPPING[preset.config["model_type"]].from_dict(dict(preset.config))
    auto = AutoModelForImageTextToText if "vision_config" in preset.config else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(hf_config, dtype=dtype)


def _on_disk_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Meta tensors under the names and shapes the checkpoint files use."""
    from transformers.core_model_loading import revert_weight_conversion

    # named_parameters drops the second name of a tied weight, so a tied lm_head is skipped.
    state = dict(model.named_parameters())
    non_persistent = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
    }
    state |= {n: b for n, b in model.named_buffers() if n not in non_persistent}
    return revert_weight_conversion(model, state)


def _init_rule(name: str, shape: tuple[int, ...], hidden: int) -> tuple[Init, float]:
    """How to fill one tensor; see the module docstring for why."""
    if name.endswith("e_score_correction_bias"):
        return Init.NORMAL, SELECTION_BIAS_STD
    if name.endswith(("mlp.gate.weight", "mlp.gate.weight_1")):
        return Init.NORMAL, 1.0 / math.sqrt(hidden)  # router; the VL file stores it transposed
    if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
        return Init.NORMAL, EMBED_STD
    if name == "model.norm.weight":
        return Init.ONES, FINAL_LOGIT_STD / (EMBED_STD * math.sqrt(hidden))
    if len(shape) == 1:
        return (Init.NORMAL, BIAS_STD) if name.endswith(".bias") else (Init.ONES, 1.0)
    return Init.NORMAL, 1.0 / math.sqrt(math.prod(shape[1:]))


# --------------------------------------------------------------------------- writing


def _generate(spec: TensorSpec, seed: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{spec.name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    out = torch.empty(spec.shape, dtype=spec.dtype)
    rows = out.view(-1, 1) if out.dim() == 0 else out
    row_elements = max(1, math.prod(spec.shape[1:]))
    step = max(1, _CHUNK_ELEMENTS // row_elements)
    for start in range(0, rows.shape[0], step):
        chunk = torch.randn(rows[start : start + step].shape, generator=generator)
        if spec.init is Init.ONES:
            chunk = chunk.mul_(NORM_JITTER).add_(1.0)
        rows[start : start + step] = chunk.mul_(spec.scale)
    return out


def _shards(specs: list[TensorSpec], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    total = sum(s.nbytes for s in specs)
    # At most half the checkpoint per shard, so even tiny models exercise sharded loading.
    limit = max_shard_bytes or min(DEFAULT_MAX_SHARD_BYTES, math.ceil(total / 2))
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def _write_weights(specs: list[TensorSpec], out: Path, *, seed: int, max_shard_bytes: int | None) -> None:
    shards = _shards(specs, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = sum(s.nbytes for s in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", file=sys.stderr) as bar:
        for index, shard in enumerate(shards, start=1):
            filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            tensors = dict(_generated(shard, seed))
            save_file(tensors, str(out / filename), metadata={"format": "pt"})
            del tensors
            weight_map |= {s.name: filename for s in shard}
            bar.update(sum(s.nbytes for s in shard))
    index_json = {
        "metadata": {"total_size": total, "total_parameters": sum(math.prod(s.shape) for s in specs)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(out / "model.safetensors.index.json", index_json)


def _generated(shard: list[TensorSpec], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    for spec in shard:
        yield spec.name, _generate(spec, seed)


def _remove_stale_weights(out: Path) -> None:
    # A rewrite with other shard sizes must not leave old shards for a loader to glob.
    for path in out.glob("model-*-of-*.safetensors"):
        path.unlink()
    for name in _WEIGHT_FILES:
        (out / name).unlink(missing_ok=True)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
