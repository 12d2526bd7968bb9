"""`bench serve` end to end against a fake OpenAI-compatible streaming server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from ernieserve.bench import cli
from tests.bench.fake_openai_server import FakeServer, Fault, fault_for

_FIELDS = [
    "Successful requests:", "Failed requests:", "Request rate configured (RPS):",
    "Benchmark duration (s):", "Total input tokens:", "Total generated tokens:",
    "Request throughput (req/s):", "Output token throughput (tok/s):",
    "Peak output token throughput (tok/s):", "Peak concurrent requests:",
    "Total Token throughput (tok/s):",
]


def _value(text: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}\s+(\S+)", text, re.MULTILINE)
    assert match, f"{label!r} missing from:\n{text}"
    return match.group(1)


def _expected_failures(n: int) -> int:
    return sum(fault_for(i) is not Fault.NONE for i in range(n))


def test_bench_serve_completions(tokenizer, tokenizer_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    num_prompts, output_len, concurrency = 40, 6, 8
    with FakeServer(tokenizer) as server:
        rc = cli.main([
            "bench", "serve", "--backend", "openai", "--host", "127.0.0.1",
            "--port", str(server.port), "--tokenizer", str(tokenizer_dir),
            "--dataset-name", "random", "--random-input-len", "32",
            "--random-output-len", str(output_len), "--random-prefix-len", "8",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(tmp_path),
            "--result-filename", "out.json", "--seed", "3",
        ])
    assert rc == 0
    out = capsys.readouterr().out
    start = out.index("============ Serving Benchmark Result")
    block = out[start:out.index("=" * 50 + "\n", start + 50) + 50]
    for label in _FIELDS + ["Maximum request concurrency:"]:
        _value(block, label)
    for metric in ("TTFT", "TPOT", "ITL", "E2EL"):
        for stat in ("Mean", "Median", "P50", "P99"):
            _value(block, f"{stat} {metric} (ms):")
    assert f"Result written to {tmp_path / 'out.json'}" in out

    failed = _expected_failures(num_prompts)
    succeeded = num_prompts - failed
    assert int(_value(block, "Successful requests:")) == succeeded
    assert int(_value(block, "Failed requests:")) == failed
    assert int(_value(block, "Total generated tokens:")) == succeeded * output_len
    assert int(_value(block, "Peak concurrent requests:")) <= concurrency

    # Every request body: the model from /v1/models, text prompt, streaming with usage.
    assert len(server.bodies) == num_prompts
    for body in server.bodies:
        assert body["model"] == "fake-ernie"
        assert isinstance(body["prompt"], str)
        assert body["max_tokens"] == output_len
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True

    result = json.loads((tmp_path / "out.json").read_text())
    ok = [i for i, err in enumerate(result["errors"]) if not err]
    assert result["completed"] == succeeded == len(ok)
    assert result["failed"] == failed
    assert result["total_output_tokens"] == succeeded * output_len
    assert result["total_input_tokens"] == sum(result["input_lens"][i] for i in ok)
    assert len(result["input_lens"]) == len(result["ttfts"]) == len(result["itls"]) == num_prompts
    assert all(result["output_lens"][i] == output_len for i in ok)
    assert all(len(result["itls"][i]) == output_len - 1 for i in ok)
    for key in ("mean_ttft_ms", "p99_tpot_ms", "median_itl_ms", "p50_e2el_ms",
                "max_output_tokens_per_s", "max_concurrent_requests", "request_throughput"):
        assert key in result
    errors = [e for e in result["errors"] if e]
    assert sum("HTTP 500" in e for e in errors) == 2
    assert sum("HTTP 400" in e for e in errors) == 2
    assert sum("stream error" in e for e in errors) == 2
    assert sum("without [DONE]" in e for e in errors) == 2
    # Client and server count the prompts with the same tokenizer: they agree.
    assert sorted(result["input_lens"][i] for i in ok) == sorted(
        server.prompt_lens[server.bodies[j]["prompt"]]
        for j in range(num_prompts) if fault_for(j) is Fault.NONE)


def test_bench_serve_chat_without_usage(tokenizer, tokenizer_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Chat endpoint, Poisson arrivals, no usage chunk: tokens counted with the tokenizer."""
    num_prompts, output_len = 10, 4
    with FakeServer(tokenizer, send_usage=False) as server:
        rc = cli.main([
            "bench", "serve", "--backend", "openai-chat", "--base-url", server.base_url,
            "--model", "fake-ernie", "--tokenizer", str(tokenizer_dir),
            "--random-input-len", "16", "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--request-rate", "200", "--burstiness", "0.5",
            "--save-result", "--result-dir", str(tmp_path), "--disable-tqdm",
        ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Maximum request concurrency" not in out
    assert _value(out, "Request rate configured (RPS):") == "200.00"
    assert "End-to-end Latency" not in out  # not selected by default
    (path,) = tmp_path.glob("openai-chat-200.0qps-fake-ernie-*.json")
    result = json.loads(path.read_text())
    failed = _expected_failures(num_prompts)
    assert result["failed"] == failed
    generated = "".join(f" t{i}" for i in range(output_len))
    per_request = len(tokenizer.encode(generated, add_special_tokens=False))
    assert result["total_output_tokens"] == (num_prompts - failed) * per_request
    assert all(body["messages"][0]["role"] == "user" for body in server.bodies)
    assert all(body["max_tokens"] == output_len for body in server.bodies)
    assert "ignore_eos" not in server.bodies[0]


def test_bench_serve_connection_refused(tokenizer_dir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rc = cli.main([
        "bench", "serve", "--port", str(port), "--model", "m", "--tokenizer",
        str(tokenizer_dir), "--random-input-len", "8", "--random-output-len", "2",
        "--num-prompts", "3", "--disable-tqdm",
    ])
    assert rc == 0
    captured = capsys.readouterr()
    assert _value(captured.out, "Successful requests:") == "0"
    assert _value(captured.out, "Failed requests:") == "3"
    assert "ClientConnectorError" in captured.err or "Connect" in captured.err


def test_bench_serve_finds_model_and_tokenizer(tokenizer, tokenizer_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """No --model, no --tokenizer: the model from /v1/models, the tokenizer from its root."""
    with FakeServer(tokenizer, model_root=str(tokenizer_dir)) as server:
        rc = cli.main(["bench", "serve", "--base-url", server.base_url, "--num-prompts", "3",
                       "--random-input-len", "8", "--random-output-len", "2", "--disable-tqdm"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Model from" in out and "fake-ernie" in out
    assert _value(out, "Successful requests:") == "3"
    assert all(body["model"] == "fake-ernie" for body in server.bodies)


def test_bench_serve_without_tokenizer_explains(tokenizer) -> None:
    with FakeServer(tokenizer) as server:
        with pytest.raises(SystemExit, match="--tokenizer"):
            cli.main(["bench", "serve", "--base-url", server.base_url, "--num-prompts", "1",
                      "--model", "no-such-model-anywhere"])
