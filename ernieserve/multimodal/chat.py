"""OpenAI chat content parts -> the messages a chat template renders + the media they name.

Accepted parts (the API server's and the offline ``LLM.chat``'s):
``{"type": "text", "text": ...}``, ``{"type": "image_url", "image_url": {"url": ...}}``,
``{"type": "video_url", "video_url": {"url": ...}}`` and, offline only, ``{"type": "image_pil",
"image_pil": <PIL image>}`` (vLLM's). A message whose parts are all text becomes one string
(every template takes that); a message with media keeps its parts, media parts reduced to
``{"type": "image"}`` / ``{"type": "video"}`` (the types HF chat templates test; the URL, maybe a
long data: URL, stays out of the template). The ERNIE-VL template renders them as ``Picture N:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>`` (videos alike), so the
media are listed in the order their placeholders appear: message by message, part by part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ernieserve.multimodal.media import FrameSampling, MediaLoader, VideoFrames

_MEDIA_ROLES = ("user", "system")  # the roles whose media the template renders


class ChatContentError(ValueError):
    """Bad message content; ``param`` is the OpenAI error param (``messages.N.content``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class ChatMedia:
    """The media of a conversation, in prompt order: URLs, or PIL images given offline."""

    images: list[str | Image.Image] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.images or self.videos)


def parse_chat_messages(messages: list[dict[str, Any]], *, takes_media: bool,
                        model: str) -> tuple[list[dict[str, Any]], ChatMedia]:
    """Messages for the chat template and the media they name; ChatContentError for bad content,
    and for media sent to a model without a vision tower."""
    media = ChatMedia()
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatContentError(f"messages[{index}] needs a string 'role'.", f"messages.{index}.role")
        out.append(_message(message, index, media, takes_media, model))
    return out, media


def _message(message: dict[str, Any], index: int, media: ChatMedia, takes_media: bool,
             model: str) -> dict[str, Any]:
    content = message.get("content")
    param = f"messages.{index}.content"
    if content is None or isinstance(content, str):
        return message
    if not isinstance(content, list):
        raise ChatContentError(f"messages[{index}].content must be a string or a list of content parts.", param)
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            parts.append({"type": "text", "text": part["text"]})
            continue
        if kind not in ("image_url", "video_url", "image_pil"):
            raise ChatContentError(f"messages[{index}]: unsupported content part {_short(part)}; use text, "
                                   "image_url or video_url parts.", param)
        modality = "video" if kind == "video_url" else "image"
        if not takes_media:
            raise ChatContentError(f"messages[{index}]: the model `{model}` takes no {modality}s (it has no vision "
                                   f"encoder); send text only.", param)
        if message["role"] not in _MEDIA_ROLES:
            raise ChatContentError(f"messages[{index}]: {modality}s are accepted in user and system messages "
                                   f"only, not in {message['role']!r} messages.", param)
        parts.append({"type": modality})
        source = _source(part, kind, index, param)
        if modality == "video":
            media.videos.append(source)  # type: ignore[arg-type]
        else:
            media.images.append(source)
    if len(parts) > len(texts):  # some media
        return {**message, "content": parts}
    return {**message, "content": "".join(texts)}


def _source(part: dict[str, Any], kind: str, index: int, param: str) -> str | Image.Image:
    value = part.get(kind)
    if kind == "image_pil":
        if not isinstance(value, Image.Image):
            raise ChatContentError(f"messages[{index}]: image_pil must be a PIL image.", param)
        return value
    url = value.get("url") if isinstance(value, dict) else value  # {"url": ...}, or the URL itself
    if not isinstance(url, str) or not url:
        raise ChatContentError(f"messages[{index}]: a {kind} part needs {kind}.url, a non-empty string.", param)
    return url


def _short(part: Any, limit: int = 80) -> str:
    text = repr(part)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_chat_media(media: ChatMedia, loader: MediaLoader,
                    sampling: FrameSampling) -> tuple[list[Image.Image], list[VideoFrames]]:
    """Fetch and decode every image and video (MediaError on the first that fails)."""
    images = [src if isinstance(src, Image.Image) else loader.load_image(src) for src in media.images]
    videos = [loader.load_video(src, sampling) for src in media.videos]
    return images, videos
