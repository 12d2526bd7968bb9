"""`ernieserve bench latency`: prefill time, per-step decode time, and memory-bandwidth use.

Each iteration draws fresh random prompts (so the prefix cache never turns a prefill into a hit)
and measures two things:

- Prefill: one ``llm.generate`` of ``batch_size`` prompts with ``max_tokens=1``.
- Decode: the same batch shape fed to ``llm.llm_engine`` with ``add_request``, then ``step()``
  until nothing is left, each call timed. Steps up to the one in which the last request got its
  first token are prefill (one step, or several under chunked prefill); every later step is a
  decode step of the whole batch.

Decode at small batch is bound by reading the weights, so ``weight bytes / step time`` is the
achieved bandwidth; with ``--mem-bandwidth-gbs`` (a measured device copy bandwidth) the report
gives the fraction reached. It counts weights only (KV cache reads are left out), and for MoE
models the experts a step skips are still counted, so treat it as an estimate.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ernieserve.bench.datasets import random_requests
from ernieserve.bench.throughput import OfflineLLM, add_engine_args, create_llm
from ernieserve.engine.step_stats import report_step_stats
from ernieserve.sampling_params import SamplingParams

_GB = 1e9


class StepEngine(Protocol):
    """The part of ``LLM.llm_engine`` used to time single steps."""

    def add_request(self, request_id: str, prompt: dict[str, Any] | str,
                    params: SamplingParams) -> None: ...

    def step(self) -> list[Any]: ...

    def has_unfinished_requests(self) -> bool: ...


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local checkpoint folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters-warmup", type=int, default=10)
    parser.add_argument("--num-iters", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mem-bandwidth-gbs", type=float, default=None,
                        help="measured device memory bandwidth in GB/s")
    parser.add_argument("--output-json", default=None, help="write the results here")
    add_engine_args(parser)


@dataclass(slots=True)
class LatencyConfig:
    batch_size: int
    input_len: int
    output_len: int
    num_iters_warmup: int
    num_iters: int
    seed: int = 0


@dataclass(slots=True)
class Iteration:
    prefill_s: float  # generate(max_tokens=1)
    decode_steps_s: list[float]
    engine_total_s: float  # add_request .. last step()


@dataclass(slots=True)
class LatencyResult:
    config: LatencyConfig
    iterations: list[Iteration]
    param_bytes: int | None
    mem_bandwidth_gbs: float | None

    def prefill_ms(self) -> np.ndarray:
        return np.array([it.prefill_s for it in self.iterations]) * 1000.0

    def decode_ms(self) -> np.ndarray:
        return np.array([s for it in self.iterations for s in it.decode_steps_s]) * 1000.0

    def summary(self) -> dict[str, Any]:
        prefill, decode = self.prefill_ms(), self.decode_ms()
        out: dict[str, Any] = {
            "batch_size": self.config.batch_size,
            "input_len": self.config.input_len,
            "output_len": self.config.output_len,
            "num_iters": len(self.iterations),
            **_stats("prefill_ms", prefill),
            **_stats("decode_step_ms", decode),
            "avg_latency_s": float(np.mean([it.engine_total_s for it in self.iterations])),
        }
        if decode.size:
            out["decode_tokens_per_s"] = self.config.batch_size / (float(np.mean(decode)) / 1000)
        if self.param_bytes is not None and decode.size:
            achieved = self.param_bytes / (float(np.median(decode)) / 1000) / _GB
            out["param_bytes"] = self.param_bytes
            out["achieved_weight_bandwidth_gbs"] = achieved
            if self.mem_bandwidth_gbs:
                out["mem_bandwidth_gbs"] = self.mem_bandwidth_gbs
                out["bandwidth_fraction"] = achieved / self.mem_bandwidth_gbs
        return out

    def report(self) -> str:
        s = self.summary()
        c = self.config
        lines = [
            f"Prefill, batch {c.batch_size} x {c.input_len} tokens (generate, max_tokens=1):",
            f"  mean {s['prefill_ms_mean']:.2f} ms, p50 {s['prefill_ms_p50']:.2f} ms, "
            f"p99 {s['prefill_ms_p99']:.2f} ms",
            f"Decode step, batch {c.batch_size} ({self.decode_ms().size} steps):",
            f"  mean {s['decode_step_ms_mean']:.3f} ms, p50 {s['decode_step_ms_p50']:.3f} ms, "
            f"p99 {s['decode_step_ms_p99']:.3f} ms",
            f"  decode throughput {s.get('decode_tokens_per_s', 0.0):.2f} tokens/s",
            f"Avg latency per iteration (engine, {c.output_len} tokens): "
            f"{s['avg_latency_s']:.4f} s",
        ]
        if "param_bytes" in s:
            lines.append(f"Weights read per decode step (MoE: the picked experts): "
                         f"{_format_bytes(s['param_bytes'])}; achieved {s['achieved_weight_bandwidth_gbs']:.2f} GB/s at the p50 step")
        if "bandwidth_fraction" in s:
            lines.append(f"Fraction of measured bandwidth ({s['mem_bandwidth_gbs']:.1f} GB/s): "
                         f"{100 * s['bandwidth_fraction']:.2f}%")
        return "\n".join(lines)


def _format_bytes(n: int) -> str:
    for unit, scale in (("GB", _GB), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _stats(prefix: str, values_ms: np.ndarray) -> dict[str, float]:
    if values_ms.size == 0:
        return {f"{prefix}_mean": 0.0, f"{prefix}_p50": 0.0, f"{prefix}_p99": 0.0}
    return {
        f"{prefix}_mean": float(np.mean(values_ms)),
        f"{prefix}_p50": float(np.percentile(values_ms, 50)),
        f"{prefix}_p99": float(np.percentile(values_ms, 99)),
    }


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)


def _prompts(llm: OfflineLLM, config: LatencyConfig, rng: np.random.Generator) -> list[dict]:
    requests = random_requests(llm.get_tokenizer(), rng, config.batch_size, config.input_len,
                               config.output_len, token_mode=True)
    return [{"prompt_token_ids": r.prompt_token_ids} for r in requests]


def time_prefill(llm: OfflineLLM, prompts: list[dict]) -> float:
    start = time.perf_counter()
    llm.generate(prompts, _greedy(1), use_tqdm=False)
    return time.perf_counter() - start


def time_decode_steps(engine: StepEngine, prompts: list[dict], output_len: int,
                      tag: str) -> tuple[list[float], float]:
    """(decode step times, total engine time) for one batch run to completion."""
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, _greedy(output_len))
    started: set[str] = set()
    steps: list[tuple[float, bool]] = []  # (seconds, every request had its first token before)
    while engine.has_unfinished_requests():
        all_started = len(started) == len(ids)
        t0 = time.perf_counter()
        outputs = engine.step()
        steps.append((time.perf_counter() - t0, all_started))
        started.update(out.request_id for out in outputs if _has_tokens(out))
    total = time.perf_counter() - start
    decode = [dt for dt, after_prefill in steps if after_prefill]
    if not decode and len(steps) > 1 and len(started) < len(ids):
        decode = [dt for dt, _ in steps[1:]]  # outputs we can't read: fall back to "first = prefill"
    return decode, total


def _has_tokens(output: Any) -> bool:
    completions = getattr(output, "outputs", None) or []
    return bool(completions) and len(completions[0].token_ids) > 0


def run_latency(llm: OfflineLLM, engine: StepEngine, config: LatencyConfig) -> list[Iteration]:
    rng = np.random.default_rng(config.seed)
    iterations: list[Iteration] = []
    for i in range(config.num_iters_warmup + config.num_iters):
        prefill = time_prefill(llm, _prompts(llm, config, rng))
        steps, total = time_decode_steps(engine, _prompts(llm, config, rng), config.output_len,
                                         tag=f"latency-{i}")
        if i >= config.num_iters_warmup:
            iterations.append(Iteration(prefill, steps, total))
    return iterations


def decode_weight_bytes(llm: Any) -> int | None:
    """Weight bytes a decode step reads (MoE: the picked experts only), when the LLM can tell."""
    if not hasattr(llm, "decode_weight_bytes"):
        return None
    return int(llm.decode_weight_bytes())


def main(args: argparse.Namespace, llm: Any | None = None) -> int:
    """``llm`` lets tests (and callers holding an engine) skip building one from ``--model``."""
    llm = llm if llm is not None else create_llm(args)
    config = LatencyConfig(args.batch_size, args.input_len, args.output_len,
                           args.num_iters_warmup, args.num_iters, args.seed)
    if config.num_iters < 1:
        raise SystemExit("bench latency: --num-iters must be at least 1")
    iterations = run_latency(llm, llm.llm_engine, config)
    result = LatencyResult(config, iterations, decode_weight_bytes(llm), args.mem_bandwidth_gbs)
    print(result.report())
    stats = report_step_stats(llm)
    if stats is not None:  # ERNIESERVE_STEP_STATS=1
        print(stats)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump({**result.summary(), "model": args.model}, f, indent=2)
    return 0
