"""Start the real API server in a subprocess on 127.0.0.1 and talk to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[3]
API_SERVER = [sys.executable, "-m", "ernieserve.entrypoints.openai.api_server"]
CLI_SERVE = [sys.executable, "-m", "ernieserve", "serve"]

# Small limits that every test server shares, so its outputs match an offline LLM built alike.
ENGINE_FLAGS = ["--device", "cpu", "--max-model-len", "512", "--block-size", "16",
                "--num-gpu-blocks-override", "256", "--max-num-seqs", "16"]
OFFLINE_KWARGS = dict(device="cpu", max_model_len=512, block_size=16, num_gpu_blocks_override=256, max_num_seqs=16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    def __init__(self, command: list[str], log_path: Path, port: int | None = None, api_key: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.api_key = api_key
        self.log_path = log_path
        self.command = command
        if "--port" not in command:
            self.command = [*command, "--host", "127.0.0.1", "--port", str(self.port)]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env=full_env)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> "RemoteServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url("/v1"), api_key=self.api_key or "unused", max_retries=0, **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url("/v1"), api_key=self.api_key or "unused", max_retries=0,
                                  **kwargs)

    def model(self) -> str:
        return self.client().models.list().data[0].id

    def engine_pid(self) -> int:
        """The engine core process: the server's child that is not multiprocessing's resource tracker."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in map(int, children):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                return pid
        raise RuntimeError(f"no engine core process among children {children}")


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics as name{labels} -> value (labels only where there are some)."""
    text = httpx.get(url, timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
