"""Online quantization: `--quantization NAME` (and `--quantization-config JSON`) -> a QuantConfig.

Accepted spellings of --quantization:

* a plain name: ``wint8``, ``wint4``, ``block_wise_fp8`` (FastDeploy's), ``fp8`` (vLLM's);
* FastDeploy's JSON form: ``'{"quantization": "wint4", "group_size": 128}'``.

Options (in the JSON form or in --quantization-config, which overrides it):

* ``group_size``: wint8 / wint4 only; 0 or -1 (default) = one scale per output channel, else a
  power of two >= 32.
* ``gemm_backend``: ``auto`` (default), ``triton``, ``torch`` or ``reference`` (plain torch; the
  only way to run fp8 schemes off Hopper, for tests).

Every method covers the dense linear layers and the MoE models' routed experts (moe.py: the
experts' `MoEMethod`, quantized one checkpoint projection at a time); embeddings, the LM head,
norms and routers stay in the model dtype.

FastDeploy methods that need checkpoints quantized offline in Paddle's format (wint2, w4a8,
w4afp8, ...) and the ones not built yet are refused with a message saying which.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from ernieserve.kernels.quant_matmul import GemmBackend
from ernieserve.layers.quantization.base import (
    QuantConfig,
    StreamingQuantLinearMethod,
    UnsupportedQuantization,
    is_streaming_quantized,
    quantization_scope,
    quantized_share,
    scoped_linear_method,
)
from ernieserve.layers.quantization.fp8 import Fp8Config
from ernieserve.layers.quantization.weight_only import WeightOnlyConfig

__all__ = [
    "Fp8Config", "QUANTIZATION_METHODS", "QuantConfig", "StreamingQuantLinearMethod", "UnsupportedQuantization",
    "WeightOnlyConfig", "is_streaming_quantized", "parse_quantization", "quantization_scope",
    "quantized_share", "scoped_linear_method",
]

_Builder = Callable[[dict[str, Any]], QuantConfig]


def _weight_only(bits: int) -> _Builder:
    def build(options: dict[str, Any]) -> QuantConfig:
        group = _int_option(options, "group_size", 0)
        return WeightOnlyConfig(bits, 0 if group == -1 else group, _backend(options))
    return build


def _fp8(block_wise: bool) -> _Builder:
    def build(options: dict[str, Any]) -> QuantConfig:
        if options.get("group_size") not in (None, 0, -1):
            raise UnsupportedQuantization("group_size applies to wint8 / wint4 only (fp8 block sizes are fixed)")
        return Fp8Config(block_wise, _backend(options))
    return build


QUANTIZATION_METHODS: dict[str, _Builder] = {
    "wint8": _weight_only(8),
    "wint4": _weight_only(4),
    "block_wise_fp8": _fp8(block_wise=True),
    "fp8": _fp8(block_wise=False),
}

_OPTIONS = {"group_size", "gemm_backend"}

# FastDeploy methods that read weights quantized offline in Paddle's format
_NEED_PADDLE_CHECKPOINTS = {"wint2", "w4a8", "w4afp8", "w8a8", "wfp8afp8", "tensor_wise_fp8"}
_NOT_BUILT = {"mix_quant": "mixed dense/MoE schemes", "kvcache": "KV-cache quantization",
              "weight_only": "the generic weight_only spelling (say wint8 or wint4)"}


def parse_quantization(value: str | None, config_json: str | None = None) -> QuantConfig | None:
    """--quantization and --quantization-config -> a QuantConfig, or None for no quantization.

    Raises UnsupportedQuantization; the caller prefixes its message with "--quantization VALUE: ".
    """
    options = _as_options(value)
    extra = _json_object(config_json, "--quantization-config") if config_json else {}
    if options is None:
        if extra:
            raise UnsupportedQuantization("--quantization-config needs --quantization (wint8, wint4, "
                                          "block_wise_fp8 or fp8)")
        return None
    options.update(extra)
    method = str(options.pop("quantization")).strip().lower()
    builder = QUANTIZATION_METHODS.get(method)
    if builder is None:
        raise UnsupportedQuantization(_refusal(method))
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise UnsupportedQuantization(f"unknown options {unknown}; supported: {sorted(_OPTIONS)}")
    return builder(options)


def _as_options(value: str | None) -> dict[str, Any] | None:
    if value is None or value.strip().lower() in ("", "none", "null"):
        return None
    text = value.strip()
    if not text.startswith("{"):
        return {"quantization": text}
    options = _json_object(text, "--quantization")
    for key in ("quant_method", "method"):  # HF's / vLLM's spelling of the method key
        if key in options and "quantization" not in options:
            options["quantization"] = options.pop(key)
    if "quantization" not in options:
        raise UnsupportedQuantization('the JSON form needs a "quantization" key, e.g. {"quantization": "wint4"}')
    return options


def _json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise UnsupportedQuantization(f"{flag} is not valid JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise UnsupportedQuantization(f"{flag} must be a JSON object")
    return parsed


def _refusal(method: str) -> str:
    supported = ", ".join(QUANTIZATION_METHODS)
    if method in _NEED_PADDLE_CHECKPOINTS:
        return (f"not supported: FastDeploy's {method} reads checkpoints quantized offline in Paddle's format; "
                f"ernieserve quantizes bf16 Hugging Face checkpoints while loading ({supported})")
    if method in _NOT_BUILT:
        return f"not supported yet ({_NOT_BUILT[method]}); supported: {supported}"
    return f"unknown quantization method; supported: {supported}"


def _int_option(options: dict[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnsupportedQuantization(f"{key} must be an integer, got {value!r}")
    return value


def _backend(options: dict[str, Any]) -> GemmBackend:
    value = options.get("gemm_backend", "auto")
    try:
        return GemmBackend(str(value).lower())
    except ValueError:
        choices = ", ".join(b.value for b in GemmBackend)
        raise UnsupportedQuantization(f"gemm_backend must be one of {choices}, got {value!r}") from None
