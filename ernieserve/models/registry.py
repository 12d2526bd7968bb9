"""`architectures` in config.json -> model class."""

from __future__ import annotations

import importlib

# architecture name -> (module, class); imported lazily so a broken optional model breaks nothing else
_MODELS: dict[str, tuple[str, str]] = {
    "Ernie4_5ForCausalLM": ("ernieserve.models.families", "Ernie4_5ForCausalLM"),
    "LlamaForCausalLM": ("ernieserve.models.families", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("ernieserve.models.families", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("ernieserve.models.families", "Qwen3ForCausalLM"),
    "Ernie4_5_MoeForCausalLM": ("ernieserve.models.ernie4_5_moe", "Ernie4_5_MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("ernieserve.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "Ernie4_5_VLMoeForConditionalGeneration": ("ernieserve.models.ernie4_5_vl",
                                               "Ernie4_5_VLMoeForConditionalGeneration"),
    "Ernie4_5_VL_MoeForConditionalGeneration": ("ernieserve.models.ernie4_5_vl",
                                                "Ernie4_5_VL_MoeForConditionalGeneration"),
}


class UnsupportedArchitecture(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(architectures: list[str] | None) -> type:
    for arch in architectures or []:
        if arch in _MODELS:
            module, name = _MODELS[arch]
            return getattr(importlib.import_module(module), name)
    raise UnsupportedArchitecture(
        f"architecture {architectures} is not supported; supported: {', '.join(supported_architectures())}")
