"""`ernieserve generate` end to end on CPU: the tiny preset, and the real ERNIE-4.5-0.3B shape."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ernieserve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_generate_tiny(tiny_ernie):
    res = run_cli("generate", "--model", str(tiny_ernie), "--max-tokens", "8", "--max-model-len", "256",
                  "--prompt", "Hello", "--prompt", "你好")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("Generated (8 tokens, length)") == 2


def test_generate_bad_flag_names_it(tiny_ernie):
    res = run_cli("generate", "--model", str(tiny_ernie), "--max-model-len", "99999999")
    assert res.returncode == 2 and "--max-model-len" in res.stderr


@pytest.mark.slow
def test_ernie_0_3b_preset_end_to_end_on_cpu(tmp_path):
    """The built-in default model (ERNIE-4.5-0.3B shapes, random weights) written on first use,
    loaded, and run through `ernieserve generate` with its chat template."""
    res = run_cli("generate", "--max-tokens", "6", "--max-model-len", "512", "--chat", "--prompt", "Hi",
                  env_extra={"ERNIESERVE_CACHE_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Generated (6 tokens" in res.stdout
    assert "Loaded Ernie4_5ForCausalLM" in res.stderr and "Engine ready" in res.stderr
    assert (tmp_path / "models" / "ernie-4.5-0.3b" / "config.json").is_file()
