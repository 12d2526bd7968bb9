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
from ernieserve.multimodal.chat import ChatMedia, load_chat_media
from ernieserve.multimodal.inputs import MultiModalItem
from ernieserve.multimodal.media import MediaLoader, VideoFrames
from ernieserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# str, or a dict with "prompt" and/or "prompt_token_ids", and optionally "multi_modal_data"
# ({"image": [...], "video": [...]}: PIL images / frame arrays / URLs) or, already processed,
# "mm_items" (then prompt_token_ids hold the expanded placeholder runs).
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
        mm = model_config.multimodal
        self.media_loader = MediaLoader(mm.allowed_local_media_path, allowed_media_domains=mm.allowed_media_domains)
        self.mm_processor = None  # images/videos -> placeholder runs + MultiModalItems (VL models only)
        if model_config.is_multimodal:
            from ernieserve.multimodal.processor import MultiModalProcessor

            self.mm_processor = MultiModalProcessor.from_pretrained(
                model_config.model, model_config.hf_config, mm.processor_options, mm.limit_per_prompt)

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
        ids, mm_items = self.process_multimodal(prompt, ids)
        self.check_prompt(ids, params)
        if params.bad_words:
            params = msgspec.structs.replace(params, bad_words_token_ids=self._bad_words_ids(params.bad_words))
        req = EngineRequest(request_id=request_id, prompt_token_ids=ids, sampling_params=params,
                            eos_token_ids=self.eos_token_ids, arrival_time=arrival_time or time.time(),
                            mm_items=mm_items)
        return text, req

    # ---- images and videos --------------------------------------------------------------------
    def process_multimodal(self, prompt: PromptType, ids: list[int]) -> tuple[list[int], list[MultiModalItem]]:
        """The prompt's ids with image/video placeholders expanded, and its items."""
        data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        items = prompt.get("mm_items") if isinstance(prompt, dict) else None
        if items is not None:  # processed already (the API server does it off the event loop)
            return ids, _checked_items(items, ids)
        if self.mm_processor is None:
            if data:
                raise ValueError(f"The model {self.model_config.served_model_name} takes no images or videos "
                                 "(it has no vision encoder); send text only.")
            return ids, []
        images, videos = self._media_of(data or {})
        return self.mm_processor.process(ids, images, videos)

    def check_media_counts(self, num_images: int, num_videos: int) -> None:
        """--limit-mm-per-prompt, checked before anything is fetched."""
        if self.mm_processor is None:
            if num_images or num_videos:
                raise ValueError(f"The model {self.model_config.served_model_name} takes no images or videos.")
            return
        self.mm_processor.check_limits(num_images, num_videos)

    def load_chat_media(self, media: ChatMedia) -> tuple[list[Any], list[VideoFrames]]:
        """Fetch and decode a conversation's media (blocking: the server runs it in a thread)."""
        self.check_media_counts(len(media.images), len(media.videos))
        assert self.mm_processor is not None  # check_media_counts refused media otherwise
        return load_chat_media(media, self.media_loader, self.mm_processor.video.sampling)

    def _media_of(self, data: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        unknown = sorted(set(data) - {"image", "video"})
        if unknown:
            raise ValueError(f"multi_modal_data: unknown modality {unknown[0]!r}; use 'image' and 'video'.")
        images = _as_list(data.get("image"), single=lambda v: not isinstance(v, list))
        # a video: a [T, H, W, 3] array, VideoFrames, a URL, or a list of frames
        videos = _as_list(data.get("video"), single=lambda v: not isinstance(v, list) or (bool(v) and _is_frame(v[0])))
        self.check_media_counts(len(images), len(videos))
        assert self.mm_processor is not None
        sampling = self.mm_processor.video.sampling
        images = [self.media_loader.load_image(x) if isinstance(x, str) else x for x in images]
        videos = [self.media_loader.load_video(x, sampling) if isinstance(x, str) else x for x in videos]
        return images, videos

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


def _as_list(value: Any, single: Any) -> list[Any]:
    """One item or a list of them (multi_modal_data takes both, as vLLM's)."""
    if value is None:
        return []
    return [value] if single(value) else list(value)


def _is_frame(value: Any) -> bool:
    """A video given as a list of frames: its first element is one frame, not a whole video."""
    import numpy as np
    from PIL import Image

    return isinstance(value, Image.Image) or (isinstance(value, np.ndarray) and value.ndim == 3)


def _checked_items(items: Any, ids: list[int]) -> list[MultiModalItem]:
    """Processed items must lie inside the prompt, in order, without overlapping."""
    if not isinstance(items, list) or not all(isinstance(i, MultiModalItem) for i in items):
        raise ValueError("mm_items must be a list of MultiModalItem.")
    end = 0
    for item in items:
        if item.offset < end or item.length < 1 or item.end > len(ids):
            raise ValueError("mm_items do not match prompt_token_ids (overlapping or out of range).")
        end = item.end
    return list(items)
