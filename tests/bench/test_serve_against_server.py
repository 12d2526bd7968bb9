"""`ernieserve bench serve` against our own API server on CPU (issue 4, acceptance 1 and 3).

One real server (tiny ERNIE checkpoint, the shared test limits: --max-model-len 512,
--max-num-seqs 16) serves every run of this module. Each run is the real command line in a
subprocess; its token totals are checked against the deltas of the server's own Prometheus
counters over the same run, and refused requests must show up as failed, not vanish.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ernieserve.bench.datasets import DatasetConfig, sample_requests
from tests.entrypoints.openai.server_utils import (API_SERVER, ENGINE_FLAGS, REPO, RemoteServer,
                                                  metrics)

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = int(ENGINE_FLAGS[ENGINE_FLAGS.index("--max-model-len") + 1])
NUM_PROMPTS = 24
OUTPUT_LEN = 16

# vLLM's "Serving Benchmark Result" block, field by field.
_FIELDS = [
    "Successful requests:", "Failed requests:", "Maximum request concurrency:",
    "Request rate configured (RPS):", "Benchmark duration (s):", "Total input tokens:",
    "Total generated tokens:", "Request throughput (req/s):", "Output token throughput (tok/s):",
    "Peak output token throughput (tok/s):", "Peak concurrent requests:",
    "Total Token throughput (tok/s):",
    *(f"{stat} {metric} (ms):" for metric in ("TTFT", "TPOT", "ITL", "E2EL")
      for stat in ("Mean", "Median", "P99")),
]

_PROMPT_TOKENS = "ernieserve:prompt_tokens_total"
_GENERATION_TOKENS = "ernieserve:generation_tokens_total"
_RECEIVED = "ernieserve:requests_number_total"
_SUCCEEDED = "ernieserve:request_success_total"


@dataclass(slots=True)
class BenchRun:
    stdout: str
    stderr: str
    block: str
    result: dict[str, Any]
    counters: dict[str, float]  # server counter deltas over the run

    def value(self, label: str) -> str:
        match = re.search(rf"^{re.escape(label)}\s+(\S+)", self.block, re.MULTILINE)
        assert match, f"{label!r} missing from:\n{self.block}"
        return match.group(1)


@pytest.fixture(scope="module")
def server(tiny_ernie: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    log = tmp_path_factory.mktemp("bench_server") / "server.log"
    srv = RemoteServer([*API_SERVER, "--model", str(tiny_ernie), *ENGINE_FLAGS], log).wait_ready()
    yield srv
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log()[-3000:]}"


def _counters(server: RemoteServer) -> dict[str, float]:
    sample = metrics(server.url("/metrics"))
    return {name: sample[name] for name in (_PROMPT_TOKENS, _GENERATION_TOKENS, _RECEIVED, _SUCCEEDED)}


def run_bench(server: RemoteServer, checkpoint: Path, result_dir: Path, *extra: str) -> BenchRun:
    """Run `python3 -m ernieserve bench serve` once; read the server's counters around it."""
    before = _counters(server)
    command = [
        sys.executable, "-m", "ernieserve", "bench", "serve", "--backend", "openai",
        "--base-url", server.base_url, "--tokenizer", str(checkpoint), "--dataset-name", "random",
        "--num-prompts", str(NUM_PROMPTS), "--max-concurrency", "8", "--ignore-eos",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", "result.json",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--seed", "0", "--disable-tqdm", *extra,
    ]
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"bench serve failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    after = _counters(server)
    out = proc.stdout
    start = out.index("=" * 12 + " Serving Benchmark Result")
    end = out.index("\n" + "=" * 50, start) + 51
    return BenchRun(stdout=out, stderr=proc.stderr, block=out[start:end],
                    result=json.loads((result_dir / "result.json").read_text()),
                    counters={name: after[name] - before[name] for name in after})


def test_bench_serve_totals_match_server_counters(server: RemoteServer, tiny_ernie: Path,
                                                  tmp_path: Path) -> None:
    run = run_bench(server, tiny_ernie, tmp_path,
                    "--random-input-len", "32", "--random-output-len", str(OUTPUT_LEN))
    print(run.block)  # shown with -s; the reply quotes it
    for label in _FIELDS:
        float(run.value(label))
    assert int(run.value("Successful requests:")) == NUM_PROMPTS == run.result["completed"]
    assert int(run.value("Failed requests:")) == 0 == run.result["failed"]
    assert run.result["errors"] == [""] * NUM_PROMPTS
    assert run.result["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS  # ignore_eos honoured

    # The same totals in the block and the JSON, and both equal the server's own counting:
    # prompt tokens as the server tokenized the text (no BOS for this tokenizer), generated
    # tokens as the engine produced them.
    total_input, total_output = run.result["total_input_tokens"], run.result["total_output_tokens"]
    assert int(run.value("Total input tokens:")) == total_input
    assert int(run.value("Total generated tokens:")) == total_output == NUM_PROMPTS * OUTPUT_LEN
    assert run.counters[_PROMPT_TOKENS] == total_input
    assert run.counters[_GENERATION_TOKENS] == total_output
    assert run.counters[_RECEIVED] == run.counters[_SUCCEEDED] == NUM_PROMPTS
    assert run.result["input_lens"] == [32] * NUM_PROMPTS  # the length fitting hit the target

    # Every latency metric was measured (non-zero) from the stream.
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert run.result[f"mean_{metric}_ms"] > 0
        assert run.result[f"p99_{metric}_ms"] >= run.result[f"median_{metric}_ms"]
    # One ITL gap per content chunk after the first. A byte token that starts a UTF-8 character
    # streams as an empty-text chunk (its text comes with the next token), which the bench does
    # not time, so a request can have fewer than OUTPUT_LEN - 1 gaps, never more.
    for ttft, itls, e2el in zip(run.result["ttfts"], run.result["itls"], run.result["e2els"]):
        assert 0 < len(itls) <= OUTPUT_LEN - 1
        assert 0 < ttft + sum(itls) <= e2el
    assert 0 < int(run.value("Peak concurrent requests:")) <= 8


def test_bench_serve_counts_context_length_refusals_as_failed(
        server: RemoteServer, tiny_ernie: Path, tmp_path: Path) -> None:
    """Prompts of 200..600 tokens against --max-model-len 512: the long ones get HTTP 400."""
    input_len, output_len, ratio = 400, OUTPUT_LEN, 0.5
    run = run_bench(server, tiny_ernie, tmp_path, "--random-input-len", str(input_len),
                    "--random-output-len", str(output_len), "--random-range-ratio", str(ratio))
    print(run.block, run.stderr, sep="\n")  # shown with -s

    # Which requests the server must refuse, from the same dataset and the server's length rule.
    from transformers import AutoTokenizer

    requests = sample_requests(
        DatasetConfig(num_prompts=NUM_PROMPTS, seed=0, random_input_len=input_len,
                      random_output_len=output_len, random_range_ratio=ratio),
        AutoTokenizer.from_pretrained(tiny_ernie))
    refused = [r.prompt_len >= MAX_MODEL_LEN or r.prompt_len + r.expected_output_len > MAX_MODEL_LEN
               for r in requests]
    failed, succeeded = sum(refused), NUM_PROMPTS - sum(refused)
    assert 0 < failed < NUM_PROMPTS, "the workload must mix refused and served requests"
    assert run.result["input_lens"] == [r.prompt_len for r in requests]

    # Failed in the block and in the JSON; the denominator is every request sent.
    assert int(run.value("Successful requests:")) == succeeded == run.result["completed"]
    assert int(run.value("Failed requests:")) == failed == run.result["failed"]
    assert run.result["num_prompts"] == NUM_PROMPTS == len(run.result["errors"])
    for was_refused, error in zip(refused, run.result["errors"]):
        if was_refused:
            assert error.startswith("HTTP 400") and "context_length_exceeded" in error, error
        else:
            assert error == ""
    assert f"{failed} requests failed" in run.stderr
    assert f"{failed} x HTTP 400 context_length_exceeded" in run.stderr, run.stderr

    # Refused requests never reach the engine; the served ones match the server's counters.
    assert run.result["total_input_tokens"] == sum(
        r.prompt_len for r, bad in zip(requests, refused) if not bad)
    assert run.counters[_PROMPT_TOKENS] == run.result["total_input_tokens"]
    assert run.counters[_GENERATION_TOKENS] == run.result["total_output_tokens"]
    assert run.counters[_RECEIVED] == run.counters[_SUCCEEDED] == succeeded
    duration = run.result["duration"]
    assert run.result["request_throughput"] == pytest.approx(succeeded / duration)


def test_bench_serve_counts_unknown_model_404s_as_failed(server: RemoteServer, tiny_ernie: Path,
                                                         tmp_path: Path) -> None:
    run = run_bench(server, tiny_ernie, tmp_path, "--model", "no-such-model",
                    "--random-input-len", "32", "--random-output-len", str(OUTPUT_LEN))
    for label in _FIELDS:
        float(run.value(label))
    assert int(run.value("Successful requests:")) == 0 == run.result["completed"]
    assert int(run.value("Failed requests:")) == NUM_PROMPTS == run.result["failed"]
    assert all(e.startswith("HTTP 404") and "model_not_found" in e for e in run.result["errors"])
    assert f"{NUM_PROMPTS} x HTTP 404 model_not_found" in run.stderr, run.stderr
    assert run.result["total_input_tokens"] == run.result["total_output_tokens"] == 0
    assert run.result["request_throughput"] == 0.0
    assert all(v == 0 for v in run.counters.values())
