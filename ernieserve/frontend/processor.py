"""Turns user prompts into EngineRequests: tokenize, chat template, defaults, validation.

Shared by the offline LLM and the API server, so both reject the same bad inputs with the same
messages (a ValueError the server maps to HTTP 400).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import msgspec

from ernieserve.config import ModelConfig
from ernieserve.engine.protocol import EngineRequest
from ernieserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any]

# generation_config.json keys that become default sampling values (vLLM's "generation config")
_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    folder = Path(path)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or "
                                "tokenizer_config.json); pass --tokenizer to name another folder.")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds for unreadable tokenizer files
        raise ValueError(f"{folder}: the tokenizer cannot be loaded ({e}).") from e


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Any | None = None) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_config.tokenizer)
        self.eos_token_ids = self._eos_ids()
        self.generation_defaults = {k: v for k, v in model_config.generation_config.items()
                                    if k in _GENERATION_DEFAULTS}

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen = self.model_config.generation_config.get("eos_token_id")
        for value in (gen if isinstance(gen, list) else [gen]):
            if isinstance(value, int):
                ids.append(value)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """The model's generation_config.json defaults, then the caller's values on top."""
        return SamplingParams(**{**self.generation_defaults, **overrides})

    # ---- prompts ------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], chat_template: str | None = None,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as e:  # jinja errors, missing template
            raise ValueError(f"The chat template cannot render these messages: {e}") from e

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers.")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self.tokenize(prompt["prompt"])
        raise ValueError("A prompt must be a string or a dict with 'prompt' or 'prompt_token_ids'.")

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams,
                arrival_time: float | None = None) -> tuple[str | None, EngineRequest]:
        text, ids = self.tokenize(prompt)
        self.check_prompt(ids, params)
        if params.bad_words:
            params = msgspec.structs.replace(params, bad_words_token_ids=self._bad_words_ids(params.bad_words))
        req = EngineRequest(request_id=request_id, prompt_token_ids=ids, sampling_params=params,
                            eos_token_ids=self.eos_token_ids, arrival_time=arrival_time or time.time())
        return text, req

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        max_len = self.model_config.max_model_len
        if not ids:
            raise ValueError("The prompt is empty; it must contain at least one token.")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"Token id out of range: prompt_token_ids must be in [0, {vocab}).")
        if len(ids) >= max_len:
            raise ValueError(f"This model's maximum context length is {max_len} tokens, but the prompt has "
                             f"{len(ids)} tokens. Shorten the prompt.")
        if params.max_tokens is not None and len(ids) + params.max_tokens > max_len:
            raise ValueError(f"This model's maximum context length is {max_len} tokens. However, you requested "
                             f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, "
                             f"{params.max_tokens} for the completion). Reduce the prompt or max_tokens.")

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        out = []
        for word in words:
            # with and without a leading space: the two spellings tokenize differently
            for variant in (word, " " + word.lstrip()):
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out
