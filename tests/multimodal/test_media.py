"""Media loading: data:/http(s)/file:// sources, their limits and errors, FastDeploy frame sampling."""

from __future__ import annotations

import os

import numpy as np
import pytest
from media_fixtures import data_url, frame_color, image_bytes, media_server, video_bytes

from ernieserve.multimodal.media import FrameSampling, MediaError, MediaLimits, MediaLoader

LOADER = MediaLoader()


# ---- images from data: URLs ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_data_url_image(fmt, mime):
    image = LOADER.load_image(data_url(image_bytes(40, 30, fmt=fmt), mime))
    assert image.mode == "RGB" and image.size == (40, 30)


def test_rgba_and_grey_images_become_rgb():
    from PIL import Image
    import io

    for mode in ("RGBA", "L", "P"):
        buf = io.BytesIO()
        Image.new(mode, (8, 8)).save(buf, format="PNG")
        assert LOADER.load_image(data_url(buf.getvalue(), "image/png")).mode == "RGB"


def test_not_an_image():
    with pytest.raises(MediaError, match="not an image in a supported format"):
        LOADER.load_image(data_url(b"%PDF-1.4 hello", "image/png"))


def test_truncated_image():
    data = image_bytes(64, 64, fmt="PNG")
    with pytest.raises(MediaError, match="broken or truncated"):
        LOADER.load_image(data_url(data[: len(data) // 2], "image/png"))


def test_bad_base64_and_missing_comma():
    with pytest.raises(MediaError, match="not valid base64"):
        LOADER.load_image("data:image/png;base64,@@@@")
    with pytest.raises(MediaError, match="no ','"):
        LOADER.load_image("data:image/png;base64")


def test_pixel_limit_is_checked_before_decoding():
    loader = MediaLoader(limits=MediaLimits(max_image_pixels=100 * 100))
    with pytest.raises(MediaError, match=r"is 200x100 pixels; at most 10000 pixels"):
        loader.load_image(data_url(image_bytes(200, 100), "image/png"))


def test_size_limit_of_data_url():
    loader = MediaLoader(limits=MediaLimits(max_image_bytes=1000))
    with pytest.raises(MediaError, match="size limit"):
        loader.load_image(data_url(image_bytes(200, 200), "image/png"))


def test_long_data_urls_are_not_echoed():
    url = data_url(b"x" * 5000, "image/png")
    with pytest.raises(MediaError) as info:
        LOADER.load_image(url)
    assert len(str(info.value)) < 300


def test_unsupported_scheme():
    with pytest.raises(MediaError, match="unsupported image URL 'ftp://host/a.png'"):
        LOADER.load_image("ftp://host/a.png")
    with pytest.raises(MediaError, match="unsupported image URL"):
        LOADER.load_image("/etc/passwd")


# ---- http(s) ------------------------------------------------------------------------------------
def test_http_fetch_and_its_failures():
    png = image_bytes(20, 10)
    routes = {
        "/ok.png": (200, {"Content-Type": "image/png"}, png, 0.0),
        "/big.png": (200, {"Content-Length": str(10**9)}, b"", 0.0),  # says 1 GB: refused before reading
        "/chunked.png": (200, {"Content-Length": "5000"}, b"\0" * 5000, 0.0),
        "/slow.png": (200, {}, png, 2.0),
    }
    loader = MediaLoader(limits=MediaLimits(max_image_bytes=4000, fetch_timeout_s=0.5))
    with media_server(routes) as base:
        assert loader.load_image(base + "/ok.png").size == (20, 10)
        with pytest.raises(MediaError, match=r"is 1000000000 bytes; the image size limit is 4000 bytes"):
            loader.load_image(base + "/big.png")
        with pytest.raises(MediaError, match=r"is 5000 bytes; the image size limit is 4000"):
            loader.load_image(base + "/chunked.png")
        with pytest.raises(MediaError, match="HTTP 404"):
            loader.load_image(base + "/missing.png")
        with pytest.raises(MediaError, match="timed out"):
            loader.load_image(base + "/slow.png")


def test_allowed_media_domains_limit_the_hosts_redirects_included():
    """--allowed-media-domains (vLLM's flag): only the listed hosts are fetched, and a redirect to
    another host is refused before it is followed (the server's own network stays out of reach)."""
    png = image_bytes(8, 8)
    with media_server({"/ok.png": (200, {"Content-Type": "image/png"}, png, 0.0)}) as other:
        port = other.rsplit(":", 1)[1]
        routes = {"/ok.png": (200, {"Content-Type": "image/png"}, png, 0.0),
                  "/away.png": (302, {"Location": f"http://localhost:{port}/ok.png"}, b"", 0.0),
                  "/stay.png": (302, {"Location": "/ok.png"}, b"", 0.0)}
        with media_server(routes) as base:
            loader = MediaLoader(allowed_media_domains=("127.0.0.1",))
            assert loader.load_image(base + "/ok.png").size == (8, 8)
            assert loader.load_image(base + "/stay.png").size == (8, 8)  # same host: followed
            with pytest.raises(MediaError, match=r"host 'localhost' is not in --allowed-media-domains \(127.0.0.1\)"):
                loader.load_image(base + "/away.png")
            with pytest.raises(MediaError, match="host 'localhost' is not in --allowed-media-domains"):
                loader.load_image(f"http://localhost:{port}/ok.png")
            assert MediaLoader().load_image(base + "/away.png").size == (8, 8)  # no list: any host


@pytest.mark.parametrize("flag", [["http://images.example.com"], ["example.com:8080"], [""]])
def test_allowed_media_domains_must_be_host_names(tiny_ernie, flag):
    from ernieserve.config import ConfigError, EngineArgs

    with pytest.raises(ConfigError, match="--allowed-media-domains"):
        EngineArgs(model=str(tiny_ernie), allowed_media_domains=flag).create_engine_config()
    cfg = EngineArgs(model=str(tiny_ernie), allowed_media_domains=["Images.Example.com."]).create_engine_config()
    assert cfg.model.multimodal.allowed_media_domains == ("images.example.com",)


def test_body_larger_than_cap_without_length_header():
    # a server that lies (a small Content-Length check passes) is still cut off while reading
    from ernieserve.multimodal import media

    class Response:
        headers = {"Content-Length": None}

        def __init__(self) -> None:
            self.chunks = [b"\0" * 3000, b"\0" * 3000, b""]

        def read(self, n: int) -> bytes:
            return self.chunks.pop(0)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    original = media.urllib.request.urlopen
    media.urllib.request.urlopen = lambda *a, **k: Response()
    try:
        with pytest.raises(MediaError, match="larger than the image size limit"):
            media._fetch("http://example.invalid/x.png", "image", 4000, 1.0)
    finally:
        media.urllib.request.urlopen = original


def test_unreachable_url():
    with media_server({}) as base:
        closed = base  # the server is shut below; its port then refuses connections
    with pytest.raises(MediaError, match="cannot fetch image URL"):
        LOADER.load_image(closed + "/a.png")


# ---- local files --------------------------------------------------------------------------------
def test_local_files_need_the_flag(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes())
    with pytest.raises(MediaError, match="--allowed-local-media-path"):
        LOADER.load_image(f"file://{tmp_path}/a.png")


def test_local_files_stay_inside_the_allowed_folder(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(image_bytes(12, 10))
    (tmp_path / "secret.png").write_bytes(image_bytes())
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    loader = MediaLoader(str(allowed))
    assert loader.load_image(f"file://{allowed}/a.png").size == (12, 10)
    for escape in (f"file://{allowed}/../secret.png", f"file://{allowed}/link.png", f"file://{tmp_path}/secret.png"):
        with pytest.raises(MediaError, match="outside --allowed-local-media-path"):
            loader.load_image(escape)
    with pytest.raises(MediaError, match="no such file"):
        loader.load_image(f"file://{allowed}/missing.png")
    with pytest.raises(MediaError, match="must name a local path"):
        loader.load_image(f"file://otherhost{allowed}/a.png")


# ---- frame sampling (FastDeploy's rules) --------------------------------------------------------
def test_target_frames_take_one_frame_per_interval():
    assert FrameSampling(target_frames=4).indices(100, 25.0) == [0, 25, 50, 75]
    assert FrameSampling(target_frames=4, frames_sample="middle").indices(100, 25.0) == [12, 37, 62, 87]
    assert FrameSampling(target_frames=50).indices(10, 25.0) == list(range(10))  # at most the video's


def test_fps_sampling_and_its_clamps():
    # 20 s at 10 fps: 2 fps gives 40 frames, one every 5 source frames
    assert FrameSampling(fps=2, min_frames=1, max_frames=100).indices(200, 10.0) == list(range(0, 200, 5))
    mid = FrameSampling(fps=2, min_frames=1, max_frames=100, frames_sample="middle").indices(200, 10.0)
    assert mid[:3] == [2, 8, 12]  # np.around rounds halves to even: 2.5 -> 2, 7.5 -> 8
    # too few at 2 fps -> min_frames, taken per interval; too many -> max_frames
    assert FrameSampling(fps=2, min_frames=8, max_frames=100).indices(40, 10.0) == list(range(0, 40, 5))
    assert len(FrameSampling(fps=2, min_frames=1, max_frames=6).indices(200, 10.0)) == 6


# ---- videos -------------------------------------------------------------------------------------
def test_video_frames_are_the_sampled_ones():
    url = data_url(video_bytes(num_frames=12, fps=4), "video/mp4")
    video = LOADER.load_video(url, FrameSampling(fps=2, min_frames=1, max_frames=100))
    assert video.indices == [0, 2, 4, 6, 8, 10]
    assert video.timestamps == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert (video.video_fps, video.total_frames) == (4.0, 12)
    for index, frame in zip(video.indices, video.frames):
        assert frame.mode == "RGB" and frame.size == (64, 48)
        mean = np.asarray(frame).reshape(-1, 3).mean(0)
        assert np.abs(mean - frame_color(index)).max() < 12, (index, mean)


def test_broken_video():
    data = video_bytes()
    with pytest.raises(MediaError, match="video .* cannot be decoded|has no video stream"):
        LOADER.load_video(data_url(data[:200], "video/mp4"), FrameSampling())
    with pytest.raises(MediaError, match="cannot be decoded|no video stream"):
        LOADER.load_video(data_url(bytes(range(256)) * 8, "video/mp4"), FrameSampling())


def test_video_size_limit(tmp_path):
    loader = MediaLoader(limits=MediaLimits(max_video_bytes=100))
    with pytest.raises(MediaError, match="video size limit"):
        loader.load_video(data_url(video_bytes(), "video/mp4"), FrameSampling())
