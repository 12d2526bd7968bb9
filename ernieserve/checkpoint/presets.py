"""Model presets for dummy checkpoints: the exact Hugging Face config.json of each model.

The full-size presets carry the configs of Baidu's ``-PT`` checkpoints (ERNIE-4.5-0.3B-PT,
ERNIE-4.5-21B-A3B-PT, ERNIE-4.5-300B-A47B-PT) and, for the VL models, the transformers-native
layout that transformers' ``convert_ernie4_5_vl_moe_to_hf.py`` produces from the original
``ERNIE-4.5-VL-*-PT`` configs (text_config / vision_config, ``mlp_layer_types``, mrope section).
The VL-424B vision-expert width (``moe_intermediate_size[1]``) could not be checked against the
real file and is our best reading.

The tiny presets keep each family's quirks at test size: ERNIE's head_dim * heads != hidden and
tied embeddings, a dense first layer with shared experts in the MoE, Qwen3's q/k norm, Qwen2's
qkv bias, Llama 3's untied head and llama3 rope scaling. Token ids in every config come from
the tokenizer layout, so config, generation_config and tokenizer always agree.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ernieserve.checkpoint.tokenizer_builder import (
    ERNIE_REAL_VOCAB_SIZE,
    TokenizerFamily,
    TokenizerLayout,
    tokenizer_layout,
)


@dataclass(slots=True, frozen=True)
class Preset:
    name: str
    config: dict[str, Any]  # exact config.json contents, without dtype (the writer adds it)
    generation_config: dict[str, Any]
    weights: bool  # False: config + tokenizer only (too big to write)
    tokenizer: TokenizerFamily
    description: str = ""
    # Set for multimodal configs, whose language-model settings sit in a nested dict.
    text_config_key: str | None = None

    @property
    def text_config(self) -> dict[str, Any]:
        """The dict holding vocab_size, hidden_size, ... (nested for VL models)."""
        return self.config[self.text_config_key] if self.text_config_key else self.config

    @property
    def vocab_size(self) -> int:
        return int(self.text_config["vocab_size"])

    @property
    def max_position_embeddings(self) -> int:
        return int(self.text_config["max_position_embeddings"])


# ----------------------------------------------------------------------------- ERNIE family


def _ernie_ids(layout: TokenizerLayout) -> dict[str, int]:
    return {
        "bos_token_id": layout.id_of("<s>"),
        "eos_token_id": layout.id_of("</s>"),
        "pad_token_id": layout.id_of("<unk>"),
    }


def _ernie_generation(layout: TokenizerLayout) -> dict[str, Any]:
    # Sampling defaults of the ERNIE 4.5 -PT generation_config.json; the chat template ends
    # assistant turns with <|end_of_sentence|>, so generation stops there as well as on </s>.
    return {
        "do_sample": True,
        "top_p": 0.8,
        "temperature": 0.8,
        "bos_token_id": layout.id_of("<s>"),
        "eos_token_id": [layout.id_of("</s>"), layout.id_of("<|end_of_sentence|>")],
        "pad_token_id": layout.id_of("<unk>"),
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
    }


def _ernie_dense(layout: TokenizerLayout, **dims: Any) -> dict[str, Any]:
    return {
        "architectures": ["Ernie4_5ForCausalLM"],
        "model_type": "ernie4_5",
        **_ernie_ids(layout),
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "use_bias": False,
        "use_cache": True,
        "vocab_size": layout.vocab_size,
    } | dims


def _ernie_moe(layout: TokenizerLayout, **dims: Any) -> dict[str, Any]:
    return {
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "model_type": "ernie4_5_moe",
        **_ernie_ids(layout),
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_bias": False,
        "use_cache": True,
        "vocab_size": layout.vocab_size,
        "moe_capacity": [64, 64, 64],
        "moe_gate": "topk",
        "moe_layer_interval": 1,
        "moe_use_aux_free": True,
    } | dims


def _ernie_vl(layout: TokenizerLayout, text: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
        "model_type": "ernie4_5_vl_moe",
        "image_token_id": layout.id_of("<|IMAGE_PLACEHOLDER|>"),
        "image_start_token_id": layout.id_of("<|IMAGE_START|>"),
        "image_end_token_id": layout.id_of("<|IMAGE_END|>"),
        "video_token_id": layout.id_of("<|VIDEO_PLACEHOLDER|>"),
        "video_start_token_id": layout.id_of("<|VIDEO_START|>"),
        "video_end_token_id": layout.id_of("<|VIDEO_END|>"),
        "tie_word_embeddings": text["tie_word_embeddings"],
        "text_config": {
            "model_type": "ernie4_5_vl_moe_text",
            **_ernie_ids(layout),
            "hidden_act": "silu",
            "max_position_embeddings": 131072,
            "moe_norm_min": 1e-12,
            "rms_norm_eps": 1e-05,
            "use_bias": False,
            "use_cache": True,
            "vocab_size": layout.vocab_size,
        }
        | text,
        "vision_config": {
            "model_type": "ernie4_5_vl_moe_vision",
            "hidden_act": "quick_gelu",
            "in_channels": 3,
            "patch_size": 14,
            "rms_norm_eps": 1e-06,
            "spatial_merge_size": 2,
            "temporal_merge_size": 2,
        }
        | vision,
    }


def _mlp_layer_types(num_layers: int, first_sparse: int) -> list[str]:
    return ["dense"] * first_sparse + ["sparse"] * (num_layers - first_sparse)


def _vl_rope(mrope_section: list[int]) -> dict[str, Any]:
    # Temporal/height/width split of the rotary half-dim (sums to head_dim / 2).
    return {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": mrope_section}


def _ernie_presets() -> list[Preset]:
    real = tokenizer_layout(TokenizerFamily.ERNIE, ERNIE_REAL_VOCAB_SIZE)
    real_vl = tokenizer_layout(TokenizerFamily.ERNIE_VL, ERNIE_REAL_VOCAB_SIZE)
    tiny = tokenizer_layout(TokenizerFamily.ERNIE, 4096)
    tiny_vl = tokenizer_layout(TokenizerFamily.ERNIE_VL, 4096)
    vision_full = {"depth": 32, "hidden_size": 1280, "intermediate_size": 5120, "num_heads": 16}
    tiny_dense = {
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,  # like the 0.3B, q_proj is wider than hidden (4 * 32 = 128 != 64)
        "max_position_embeddings": 4096,
    }
    ernie = TokenizerFamily.ERNIE
    return [
        Preset(
            "ernie-4.5-0.3b",
            _ernie_dense(
                real, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
                num_attention_heads=16, num_key_value_heads=2, head_dim=128,
            ),  # fmt: skip
            _ernie_generation(real), True, ernie, "ERNIE-4.5-0.3B-PT (dense, 0.36B params)",
        ),
        Preset(
            "ernie-4.5-21b-a3b",
            _ernie_moe(
                real, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28,
                num_attention_heads=20, num_key_value_heads=4, head_dim=128,
                moe_num_experts=64, moe_num_shared_experts=2, moe_k=6,
                moe_intermediate_size=1536, moe_layer_start_index=1, moe_layer_end_index=27,
                tie_word_embeddings=True,
            ),  # fmt: skip
            _ernie_generation(real), False, ernie, "ERNIE-4.5-21B-A3B-PT (MoE 64 experts, top-6)",
        ),
        Preset(
            "ernie-4.5-300b-a47b",
            _ernie_moe(
                real, hidden_size=8192, intermediate_size=28672, num_hidden_layers=54,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                moe_num_experts=64, moe_num_shared_experts=0, moe_k=8,
                moe_intermediate_size=3584, moe_layer_start_index=3, moe_layer_end_index=53,
                tie_word_embeddings=False,
            ),  # fmt: skip
            _ernie_generation(real), False, ernie, "ERNIE-4.5-300B-A47B-PT (MoE 64 experts, top-8)",
        ),
        Preset(
            "ernie-4.5-vl-28b-a3b",
            _ernie_vl(
                real_vl,
                text={
                    "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 28,
                    "num_attention_heads": 20, "num_key_value_heads": 4,
                    "moe_num_experts": 64, "moe_num_shared_experts": 2, "moe_k": 6,
                    "moe_intermediate_size": [1536, 512],
                    "mlp_layer_types": _mlp_layer_types(28, 1),
                    "rope_parameters": _vl_rope([22, 22, 20]), "tie_word_embeddings": True,
                },
                vision=vision_full,
            ),  # fmt: skip
            _ernie_generation(real_vl), False, TokenizerFamily.ERNIE_VL,
            "ERNIE-4.5-VL-28B-A3B-PT (text + vision experts), transformers-native layout",
            text_config_key="text_config",
        ),
        Preset(
            "ernie-4.5-vl-424b-a47b",
            _ernie_vl(
                real_vl,
                text={
                    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 54,
                    "num_attention_heads": 64, "num_key_value_heads": 8,
                    "moe_num_experts": 64, "moe_num_shared_experts": 0, "moe_k": 8,
                    "moe_intermediate_size": [3584, 1536],
                    "mlp_layer_types": _mlp_layer_types(54, 3),
                    "rope_parameters": _vl_rope([22, 22, 20]), "tie_word_embeddings": False,
                },
                vision=vision_full,
            ),  # fmt: skip
            _ernie_generation(real_vl), False, TokenizerFamily.ERNIE_VL,
            "ERNIE-4.5-VL-424B-A47B-PT (text + vision experts), transformers-native layout",
            text_config_key="text_config",
        ),
        Preset(
            "tiny-ernie-4.5",
            _ernie_dense(tiny, **tiny_dense),
            _ernie_generation(tiny), True, ernie, "tiny dense ERNIE 4.5, tied embeddings",
        ),
        Preset(
            "tiny-ernie-4.5-bias",
            _ernie_dense(tiny, **(tiny_dense | {"num_hidden_layers": 2, "use_bias": True})),
            _ernie_generation(tiny), True, ernie, "tiny dense ERNIE 4.5 with use_bias=true",
        ),
        Preset(
            "tiny-ernie-4.5-moe",
            _ernie_moe(
                tiny, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=4096, moe_num_experts=8, moe_num_shared_experts=2,
                moe_k=2, moe_intermediate_size=32, moe_layer_start_index=1,
                moe_layer_end_index=2, tie_word_embeddings=True,
            ),  # fmt: skip
            _ernie_generation(tiny), True, ernie,
            "tiny ERNIE 4.5 MoE: dense layer 0, 8 experts top-2 + 2 shared",
        ),
        Preset(
            "tiny-ernie-4.5-vl",
            _ernie_vl(
                tiny_vl,
                text={
                    "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 3,
                    "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 4096, "moe_num_experts": 4,
                    "moe_num_shared_experts": 1, "moe_k": 2, "moe_intermediate_size": [32, 16],
                    "mlp_layer_types": _mlp_layer_types(3, 1),
                    "rope_parameters": _vl_rope([3, 3, 2]), "tie_word_embeddings": True,
                },
                vision={"depth": 2, "hidden_size": 32, "intermediate_size": 128, "num_heads": 2},
            ),  # fmt: skip
            _ernie_generation(tiny_vl), True, TokenizerFamily.ERNIE_VL,
            "tiny ERNIE 4.5 VL: 2-block vision tower, 4 text + 4 vision experts",
            text_config_key="text_config",
        ),
    ]


# ----------------------------------------------------------------------------- other families


def _qwen_stop(layout: TokenizerLayout) -> list[int]:
    return [layout.id_of("<|im_end|>"), layout.id_of("<|endoftext|>")]


def _qwen_presets() -> list[Preset]:
    q3 = tokenizer_layout(TokenizerFamily.QWEN3, 4160)
    q2 = tokenizer_layout(TokenizerFamily.QWEN2, 3968)
    common = {
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }
    qwen3 = common | {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "bos_token_id": q3.id_of("<|endoftext|>"),
        "eos_token_id": q3.id_of("<|im_end|>"),
        "attention_bias": False,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,  # like Qwen3-0.6B, 4 * 32 != hidden
        "max_window_layers": 2,
        "tie_word_embeddings": True,
        "vocab_size": q3.vocab_size,
    }
    qwen2 = common | {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "bos_token_id": q2.id_of("<|endoftext|>"),
        "eos_token_id": q2.id_of("<|im_end|>"),
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_window_layers": 2,
        "tie_word_embeddings": False,
        "vocab_size": q2.vocab_size,
    }
    return [
        Preset(
            "tiny-qwen3", qwen3,
            {
                "bos_token_id": q3.id_of("<|endoftext|>"), "do_sample": True,
                "eos_token_id": _qwen_stop(q3), "pad_token_id": q3.id_of("<|endoftext|>"),
                "temperature": 0.6, "top_k": 20, "top_p": 0.95,
            },
            True, TokenizerFamily.QWEN3, "tiny Qwen3 (q/k RMSNorm, tied embeddings)",
        ),
        Preset(
            "tiny-qwen2", qwen2,
            {
                "bos_token_id": q2.id_of("<|endoftext|>"), "do_sample": True,
                "eos_token_id": _qwen_stop(q2), "pad_token_id": q2.id_of("<|endoftext|>"),
                "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
            },
            True, TokenizerFamily.QWEN2, "tiny Qwen2.5 (qkv bias, untied head)",
        ),
    ]  # fmt: skip


def _llama_presets() -> list[Preset]:
    lay = tokenizer_layout(TokenizerFamily.LLAMA3, 4352)
    stop = [lay.id_of("<|end_of_text|>"), lay.id_of("<|eom_id|>"), lay.id_of("<|eot_id|>")]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": lay.id_of("<|begin_of_text|>"),
        "eos_token_id": stop,
        "head_dim": 32,
        "hidden_act": "silu",
        "hidden_size": 128,
        "initializer_range": 0.02,
        "intermediate_size": 256,
        "max_position_embeddings": 4096,
        "mlp_bias": False,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        # Llama 3.1's scaling, shrunk with the context: 512 * 8 = 4096 like 8192 * 16 = 131072.
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 512,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": lay.vocab_size,
    }
    generation = {
        "bos_token_id": lay.id_of("<|begin_of_text|>"),
        "do_sample": True,
        "eos_token_id": stop,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    return [
        Preset(
            "tiny-llama", config, generation, True, TokenizerFamily.LLAMA3,
            "tiny Llama 3.1 (untied head, llama3 rope scaling)",
        )
    ]  # fmt: skip


PRESETS: dict[str, Preset] = {
    p.name: p for p in (*_ernie_presets(), *_qwen_presets(), *_llama_presets())
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``, as a private copy (callers may edit its dicts)."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
    return copy.deepcopy(preset)
