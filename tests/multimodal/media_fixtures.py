"""Small images, videos and a local HTTP server for the multimodal tests (no network needed)."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import av
import numpy as np
from PIL import Image


def image_bytes(width: int = 64, height: int = 48, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def frame_color(index: int) -> tuple[int, int, int]:
    """A flat colour per frame index, far enough apart to survive mpeg4 compression."""
    return (index * 20) % 256, 255 - (index * 20) % 256, 128


def video_bytes(num_frames: int = 12, fps: int = 4, width: int = 64, height: int = 48) -> bytes:
    """An mp4 whose frame i is filled with frame_color(i)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            pixels = np.empty((height, width, 3), dtype=np.uint8)
            pixels[:] = frame_color(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes, float]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status, headers, body, delay = self.routes.get(self.path, (404, {}, b"not found", 0.0))
        if delay:
            time.sleep(delay)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def media_server(routes: dict[str, tuple[int, dict[str, str], bytes, float]]) -> Iterator[str]:
    """Serves ``routes`` (path -> status, headers, body, delay_s) on 127.0.0.1; yields the base URL."""
    handler = type("Handler", (_Handler,), {"routes": routes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
