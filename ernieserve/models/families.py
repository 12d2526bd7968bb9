"""The dense families served by the shared decoder, each one a spec read from its HF config."""

from __future__ import annotations

from ernieserve.distributed.parallel_state import SINGLE
from ernieserve.models.decoder import DecoderForCausalLM, DecoderSpec


class Ernie4_5ForCausalLM(DecoderForCausalLM):
    """ERNIE 4.5 dense (0.3B): GQA, interleaved RoPE, optional biases everywhere (`use_bias`)."""

    def __init__(self, cfg, backend, dtype, tp=None):  # type: ignore[no-untyped-def]
        bias = bool(getattr(cfg, "use_bias", False))
        self.spec = DecoderSpec(rope_interleaved=True, qkv_bias=bias, o_bias=bias, mlp_bias=bias, qk_norm=False)
        super().__init__(cfg, backend, dtype, tp or SINGLE)


class LlamaForCausalLM(DecoderForCausalLM):
    def __init__(self, cfg, backend, dtype, tp=None):  # type: ignore[no-untyped-def]
        bias = bool(getattr(cfg, "attention_bias", False))
        self.spec = DecoderSpec(rope_interleaved=False, qkv_bias=bias, o_bias=bias,
                                mlp_bias=bool(getattr(cfg, "mlp_bias", False)), qk_norm=False)
        super().__init__(cfg, backend, dtype, tp or SINGLE)


class Qwen2ForCausalLM(DecoderForCausalLM):
    def __init__(self, cfg, backend, dtype, tp=None):  # type: ignore[no-untyped-def]
        self.spec = DecoderSpec(rope_interleaved=False, qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)
        super().__init__(cfg, backend, dtype, tp or SINGLE)


class Qwen3ForCausalLM(DecoderForCausalLM):
    def __init__(self, cfg, backend, dtype, tp=None):  # type: ignore[no-untyped-def]
        bias = bool(getattr(cfg, "attention_bias", False))
        self.spec = DecoderSpec(rope_interleaved=False, qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)
        super().__init__(cfg, backend, dtype, tp or SINGLE)
