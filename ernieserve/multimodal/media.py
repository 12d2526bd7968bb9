"""Loading the images and videos a request names: ``data:`` URLs, http(s) URLs and local files.

* ``data:[<type>][;base64],<payload>``: decoded in memory.
* ``http://`` / ``https://``: fetched with a timeout (`MediaLimits.fetch_timeout_s`, 15 s) and a
  size cap (`MediaLimits.max_image_bytes` 32 MiB, `max_video_bytes` 256 MiB), checked against
  Content-Length first and then while reading, so an oversized body is never held whole. With
  ``--allowed-media-domains`` only those hosts are fetched, redirects included (as vLLM); without
  it any host is, the server's own network included.
* ``file://``: only under ``--allowed-local-media-path`` (as vLLM). The path is resolved first
  (symlinks and ``..``), so nothing outside the folder can be reached through the folder.

Images are decoded with Pillow, refused above `MediaLimits.max_image_pixels` (checked from the
header, before the pixels are decoded: a small PNG can declare a huge canvas) and converted to
RGB. Videos are decoded with PyAV (FFmpeg); frames are sampled as FastDeploy samples them (see
`FrameSampling`) and only the sampled frames are converted to images.

Every failure is a `MediaError` (a ValueError, so the server answers 400) that says which input
failed and why; long ``data:`` URLs are shortened in messages.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

_USER_AGENT = "ernieserve-media-loader"
_READ_CHUNK = 1 << 16


class MediaError(ValueError):
    """An image or video that cannot be loaded; the message says which and why."""


@dataclass(frozen=True, slots=True)
class MediaLimits:
    fetch_timeout_s: float = 15.0  # connect + each read of an http(s) fetch
    max_image_bytes: int = 32 * 1024**2  # encoded size of one image
    max_video_bytes: int = 256 * 1024**2  # encoded size of one video
    max_image_pixels: int = 8192 * 8192  # width * height of an image or a video frame


@dataclass(frozen=True, slots=True)
class FrameSampling:
    """Which frames of a video to keep (FastDeploy's ``video_*`` processor options).

    ``target_frames`` > 0: that many frames (at most the video's), one per equal interval.
    Otherwise ``int(duration * fps)`` frames, raised to ``min_frames`` / lowered to ``max_frames``
    (then taken one per equal interval), else one every ``1 / fps`` seconds. ``leading`` takes the
    first frame of each interval, ``middle`` its middle.
    """

    fps: float = 2.0
    min_frames: int = 16
    max_frames: int = 180
    target_frames: int = -1
    frames_sample: str = "leading"

    def indices(self, num_frames: int, video_fps: float) -> list[int]:
        if num_frames < 1:
            raise MediaError("the video has no frames.")
        target = self.target_frames
        if target <= 0:
            wanted = int(num_frames / video_fps * self.fps)
            if wanted < self.min_frames:
                target = self.min_frames
            elif wanted > self.max_frames:
                target = self.max_frames
        if target > 0:
            count = min(target, num_frames)
            edges = np.linspace(0, num_frames, count + 1).astype(np.int64)
            starts, ends = edges[:-1], edges[1:] - 1
            chosen = starts if self.frames_sample == "leading" else (starts + ends) // 2
            return [int(i) for i in chosen]
        step = 1.0 / self.fps
        duration = num_frames / video_fps
        offset = 0.0 if self.frames_sample == "leading" else step / 2
        seconds = np.arange(offset, duration + offset, step)
        frames = np.around(seconds * video_fps).astype(np.int64)
        return [int(i) for i in frames if i < num_frames]


@dataclass(slots=True)
class VideoFrames:
    """The sampled frames of one video, in order, with when each was shown."""

    frames: list[Image.Image]  # RGB
    timestamps: list[float]  # seconds from the start of the video
    video_fps: float = 0.0  # the source's average frame rate (0 when given as frames)
    total_frames: int = 0  # frames in the source
    indices: list[int] = field(default_factory=list)  # the sampled frames' indices in the source


@dataclass(frozen=True, slots=True)
class MediaLoader:
    """Turns the URLs of a request's image/video parts into images and sampled frames."""

    allowed_local_media_path: str | None = None
    limits: MediaLimits = MediaLimits()
    allowed_media_domains: tuple[str, ...] | None = None  # http(s) hosts allowed; None: any

    # ---- bytes ---------------------------------------------------------------------------------
    def read_bytes(self, url: str, modality: str) -> bytes:
        """The encoded bytes ``url`` names; ``modality`` ("image" | "video") picks the size cap."""
        if not isinstance(url, str) or not url:
            raise MediaError(f"the {modality} URL must be a non-empty string.")
        cap = self.limits.max_image_bytes if modality == "image" else self.limits.max_video_bytes
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return _data_url_bytes(url, modality, cap)
        if scheme in ("http", "https"):
            if self.allowed_media_domains is not None:
                _check_host(url, modality, self.allowed_media_domains)
            return _fetch(url, modality, cap, self.limits.fetch_timeout_s, self.allowed_media_domains)
        if scheme == "file":
            return self._local_file(url, modality, cap)
        raise MediaError(f"unsupported {modality} URL {_shown(url)}: use a data: URL, an http(s) URL, or a "
                         "file:// URL under --allowed-local-media-path.")

    def _local_file(self, url: str, modality: str, cap: int) -> bytes:
        if self.allowed_local_media_path is None:
            raise MediaError(f"local {modality} files are not allowed ({_shown(url)}): start the server with "
                             "--allowed-local-media-path DIR to serve files under DIR.")
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(f"{_shown(url)}: a file:// URL must name a local path (file:///path).")
        root = Path(self.allowed_local_media_path).resolve()
        path = Path(urllib.parse.unquote(parsed.path)).resolve()  # symlinks and .. resolved first
        if not path.is_relative_to(root):
            raise MediaError(f"{_shown(url)} is outside --allowed-local-media-path ({root}).")
        if not path.is_file():
            raise MediaError(f"{_shown(url)}: no such file.")
        size = path.stat().st_size
        if size > cap:
            raise MediaError(f"{_shown(url)} is {size} bytes; the {modality} size limit is {cap} bytes.")
        return path.read_bytes()

    # ---- decoding ------------------------------------------------------------------------------
    def load_image(self, url: str) -> Image.Image:
        return decode_image(self.read_bytes(url, "image"), _shown(url), self.limits.max_image_pixels)

    def load_video(self, url: str, sampling: FrameSampling) -> VideoFrames:
        return decode_video(self.read_bytes(url, "video"), _shown(url), sampling, self.limits.max_image_pixels)


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """RGB image from encoded bytes; MediaError for anything Pillow cannot read whole."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise MediaError(f"image {name}: not an image in a supported format (PNG, JPEG, WebP, GIF, BMP, "
                         "TIFF, ...).") from None
    except Exception as e:  # Pillow raises many kinds for malformed headers
        raise MediaError(f"image {name} cannot be read: {e}.") from None
    width, height = image.size
    if width * height > max_pixels:
        raise MediaError(f"image {name} is {width}x{height} pixels; at most {max_pixels} pixels are accepted.")
    if width < 1 or height < 1:
        raise MediaError(f"image {name} is empty ({width}x{height}).")
    try:
        image.load()  # decode now: a truncated or corrupt file fails here, not inside the processor
        return image.convert("RGB")
    except Exception as e:
        raise MediaError(f"image {name} is broken or truncated: {e}.") from None


def decode_video(data: bytes, name: str, sampling: FrameSampling, max_pixels: int) -> VideoFrames:
    """The frames `sampling` picks from an encoded video, as RGB images."""
    import av  # imported here: only video requests need FFmpeg

    try:
        total, fps = _count_frames(av, data)
        wanted = sampling.indices(total, fps)
        frames = _decode_frames(av, data, wanted, max_pixels, name)
    except MediaError as e:
        raise MediaError(f"video {name}: {e}") from None
    except (av.FFmpegError, StopIteration, ValueError) as e:
        raise MediaError(f"video {name} cannot be decoded: {e}.") from None
    return VideoFrames(frames, [i / fps for i in wanted], fps, total, wanted)


def _count_frames(av: object, data: bytes) -> tuple[int, float]:
    with av.open(io.BytesIO(data), mode="r") as container:  # type: ignore[attr-defined]
        streams = container.streams.video
        if not streams:
            raise MediaError("the file has no video stream.")
        stream = streams[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        total = int(stream.frames or 0)
        if total <= 0:  # some containers do not store a frame count: count by decoding
            total = sum(1 for _ in container.decode(stream))
        if fps <= 0 or not math.isfinite(fps):
            raise MediaError("the video has no frame rate.")
        return total, fps


def _decode_frames(av: object, data: bytes, wanted: list[int], max_pixels: int, name: str) -> list[Image.Image]:
    targets = set(wanted)
    by_index: dict[int, Image.Image] = {}
    tail = None  # the last frame decoded, whatever its index
    with av.open(io.BytesIO(data), mode="r") as container:  # type: ignore[attr-defined]
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if frame.width * frame.height > max_pixels:
                raise MediaError(f"frames are {frame.width}x{frame.height} pixels; at most {max_pixels} pixels "
                                 "per frame are accepted.")
            tail = frame
            if index in targets:
                by_index[index] = frame.to_image().convert("RGB")
            if index >= wanted[-1]:
                break
    if tail is None:
        raise MediaError("no frame could be decoded.")
    # A container whose frame count overstates what decodes: the missing tail repeats the last frame.
    fallback = tail.to_image().convert("RGB") if len(by_index) < len(targets) else None
    return [by_index.get(index, fallback) for index in wanted]  # type: ignore[misc]


# ---- sources ------------------------------------------------------------------------------------
def _shown(url: str, limit: int = 80) -> str:
    """The URL as error messages show it: a data: URL's payload is never echoed whole."""
    return repr(url if len(url) <= limit else url[: limit - 3] + "...")


def _data_url_bytes(url: str, modality: str, cap: int) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise MediaError(f"{modality} data URL {_shown(url)} has no ',' before its data.")
    if header.endswith(";base64"):
        if len(payload) * 3 // 4 > cap + 3:
            raise MediaError(f"the {modality} data URL holds more than {cap} bytes (the {modality} size limit).")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(f"{modality} data URL {_shown(url)}: the payload is not valid base64.") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > cap:
        raise MediaError(f"the {modality} data URL holds {len(data)} bytes; the {modality} size limit is {cap}.")
    if not data:
        raise MediaError(f"{modality} data URL {_shown(url)} is empty.")
    return data


def _check_host(url: str, modality: str, allowed: tuple[str, ...]) -> None:
    host = (urllib.parse.urlparse(url).hostname or "").rstrip(".")
    if host not in allowed:
        raise MediaError(f"{modality} URL {_shown(url)}: host {host or '(none)'!r} is not in --allowed-media-domains "
                         f"({', '.join(allowed)}).")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an allowed host (--allowed-media-domains)."""

    def __init__(self, modality: str, allowed: tuple[str, ...]) -> None:
        self.modality, self.allowed = modality, allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        _check_host(newurl, self.modality, self.allowed)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, modality: str, cap: int, timeout_s: float, allowed: tuple[str, ...] | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    opener = urllib.request.urlopen if allowed is None else \
        urllib.request.build_opener(_CheckedRedirects(modality, allowed)).open
    try:
        with opener(request, timeout=timeout_s) as response:  # noqa: S310 (http(s) only)
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > cap:
                raise MediaError(f"{modality} URL {_shown(url)} is {declared} bytes; the {modality} size limit "
                                 f"is {cap} bytes.")
            body = bytearray()
            while chunk := response.read(_READ_CHUNK):
                body += chunk
                if len(body) > cap:
                    raise MediaError(f"{modality} URL {_shown(url)} is larger than the {modality} size limit "
                                     f"({cap} bytes).")
            return bytes(body)
    except MediaError:
        raise
    except urllib.error.HTTPError as e:
        raise MediaError(f"cannot fetch {modality} URL {_shown(url)}: HTTP {e.code} {e.reason}.") from None
    except urllib.error.URLError as e:
        raise MediaError(f"cannot fetch {modality} URL {_shown(url)}: {e.reason}.") from None
    except (TimeoutError, OSError, ValueError) as e:  # read timeouts, resets, malformed URLs
        kind = "timed out" if isinstance(e, TimeoutError) else str(e)
        raise MediaError(f"cannot fetch {modality} URL {_shown(url)}: {kind}.") from None
