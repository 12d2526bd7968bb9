"""Starting, stopping and failing: SIGTERM drains in-flight streams and exits 0, a dead engine
is reported instead of hanging, and startup errors exit with the engine's message."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading

import httpx
import openai
import pytest

from server_utils import API_SERVER, CLI_SERVE, ENGINE_FLAGS, REPO, RemoteServer, free_port, wait_for

pytestmark = pytest.mark.slow


def _stream(server: RemoteServer, model: str, results: dict, started: threading.Event, i: int,
            max_tokens: int) -> None:
    text, usage, error = "", None, None
    try:
        for chunk in server.client(timeout=120).completions.create(
                model=model, prompt=f"request {i}: the quick brown fox", max_tokens=max_tokens, temperature=0.0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            started.set()
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
    except Exception as e:  # recorded for the test to inspect
        error = e
    started.set()
    results[i] = (text, usage, error)


def test_sigterm_during_streams_finishes_them_and_exits_0(tiny_ernie, tmp_path):
    # the seed's `vllm serve MODEL --trust-remote-code`, everything else at its default
    server = RemoteServer([*CLI_SERVE, str(tiny_ernie), "--trust-remote-code"], tmp_path / "server.log")
    server.wait_ready()
    model = server.model()
    results: dict = {}
    started = [threading.Event() for _ in range(4)]
    threads = [threading.Thread(target=_stream, args=(server, model, results, started[i], i, 48)) for i in range(4)]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)
    engine_pid = server.engine_pid()
    server.proc.send_signal(signal.SIGTERM)

    def refuses_connections() -> bool:
        try:
            httpx.get(server.url("/health"), timeout=1)
        except httpx.ConnectError:
            return True
        except httpx.HTTPError:
            return False
        return False

    assert wait_for(refuses_connections, timeout=10), "still accepting connections after SIGTERM"
    for t in threads:
        t.join(120)
    for i in range(4):
        text, usage, error = results[i]
        assert error is None, f"stream {i} failed: {error!r}"
        assert usage is not None and usage.completion_tokens == 48, f"stream {i} was cut short"
    assert server.wait_exit(60) == 0, server.log()[-3000:]
    assert not os.path.exists(f"/proc/{engine_pid}") or _is_zombie(engine_pid), "engine process left running"
    assert "Traceback" not in server.log()


def _is_zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_engine_death_reported_not_hanging(tiny_ernie, tmp_path):
    server = RemoteServer([*API_SERVER, "--model", str(tiny_ernie), *ENGINE_FLAGS], tmp_path / "server.log")
    server.wait_ready()
    model = server.model()
    results: dict = {}
    started = threading.Event()
    thread = threading.Thread(target=_stream, args=(server, model, results, started, 0, 480))
    thread.start()
    assert started.wait(60)
    os.kill(server.engine_pid(), signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive(), "the stream hung after the engine died"
    _, _, error = results[0]
    assert isinstance(error, openai.APIError) and "engine" in str(error).lower()
    r = httpx.get(server.url("/health"))
    assert r.status_code == 503
    body = r.json()["error"]
    assert body["code"] == "engine_dead" and body["type"] == "server_error"
    assert "exited unexpectedly" in body["message"]
    with pytest.raises(openai.InternalServerError) as info:
        server.client().completions.create(model=model, prompt="hi", max_tokens=2)
    assert info.value.status_code == 503
    assert "engine core process exited unexpectedly" in server.log()
    assert server.stop() == 0


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_engine_startup_failure_exits_1_with_message(tiny_ernie, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_ernie, broken)
    for f in broken.glob("*.safetensors*"):
        f.unlink()
    port = free_port()
    r = _run([*API_SERVER, "--model", str(broken), *ENGINE_FLAGS, "--host", "127.0.0.1", "--port", str(port)])
    assert r.returncode == 1, r.stderr[-3000:]
    assert "the engine failed to start" in r.stderr
    assert "no *.safetensors weight files" in r.stderr.splitlines()[-1]


def test_bad_flag_value_exits_2_before_starting(tiny_ernie):
    r = _run([*API_SERVER, "--model", str(tiny_ernie), "--device", "cpu", "--max-model-len", "100000"])
    assert r.returncode == 2
    assert "--max-model-len 100000 exceeds the model's max_position_embeddings (4096)" in r.stderr
    assert "engine core process started" not in r.stderr


def test_busy_port_exits_2_with_message(tiny_ernie):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _run([*API_SERVER, "--model", str(tiny_ernie), *ENGINE_FLAGS, "--host", "127.0.0.1",
                  "--port", str(port)])
    assert r.returncode == 2
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in r.stderr
