"""`ernieserve bench serve`: load-test any OpenAI-compatible server, vLLM's flags and report.

Requests leave on a Poisson schedule (gamma-distributed gaps; ``--burstiness`` is the shape, 1.0
gives exponential gaps) or all at once for ``--request-rate inf``, capped in flight by
``--max-concurrency``. Each request streams (``stream_options.include_usage``) and is timed from
its server-sent events; see metrics.py for the definitions. A request that gets an HTTP error,
an error event, a broken connection or a stream that ends without ``[DONE]`` is a failure: it is
counted, its error text kept, and it stays out of every throughput and latency number.

Input lengths are the prompts' token counts with ``--tokenizer``; for ``openai-chat`` the
server's chat template adds a few tokens that are not counted, as in vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from ernieserve.bench.datasets import (
    DatasetConfig, SampleRequest, Tokenizer, add_dataset_args, sample_requests,
)
from ernieserve.bench.metrics import (
    BenchmarkMetrics, MetricName, RequestResult, compute_metrics, format_report, metrics_to_dict,
    parse_metric_names, parse_percentiles,
)

_REQUEST_TIMEOUT_S = 6 * 60 * 60
_READ_BUFSIZE = 16 * 1024 * 1024  # one SSE line can hold a long chunk; aiohttp's default is 64 KiB
_ERROR_TEXT_LIMIT = 500


class Backend(str, Enum):
    COMPLETIONS = "openai"
    CHAT = "openai-chat"

    @property
    def default_endpoint(self) -> str:
        return "/v1/completions" if self is Backend.COMPLETIONS else "/v1/chat/completions"


# "vllm" is vLLM's older default backend name; it speaks /v1/completions.
_BACKEND_ALIASES = {"openai": Backend.COMPLETIONS, "vllm": Backend.COMPLETIONS,
                    "openai-chat": Backend.CHAT}


@dataclass(frozen=True, slots=True)
class ServeConfig:
    backend: Backend
    api_url: str
    model: str
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    ignore_eos: bool
    seed: int
    disable_tqdm: bool
    sampling: dict[str, float | int]  # extra body fields: temperature, top_p, top_k


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=sorted(_BACKEND_ALIASES), default="openai",
                        help="openai: /v1/completions; openai-chat: /v1/chat/completions")
    parser.add_argument("--base-url", default=None, help="server URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint", default=None, help="default: by backend")
    parser.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    parser.add_argument("--served-model-name", default=None,
                        help="name sent in requests, if it differs from --model")
    parser.add_argument("--tokenizer", default=None,
                        help="HF tokenizer folder; default: the model if it is a local folder, "
                        "else the server's /v1/models root, else the model as a cached hub id")
    parser.add_argument("--trust-remote-code", action="store_true")
    add_dataset_args(parser)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second (Poisson arrivals); inf sends all at once")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the arrival gaps; 1 = Poisson, <1 burstier")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true")
    parser.add_argument("--temperature", type=float, default=0.0, help="default: greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                        help="comma list of ttft, tpot, itl, e2el")
    parser.add_argument("--metric-percentiles", default="99", help="comma list, e.g. 50,90,99")
    parser.add_argument("--save-result", action="store_true")
    parser.add_argument("--result-dir", default=None)
    parser.add_argument("--result-filename", default=None)
    parser.add_argument("--disable-tqdm", action="store_true")


# --------------------------------------------------------------------------------------------
# one request


def build_payload(config: ServeConfig, request: SampleRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": config.model,
        "max_tokens": request.expected_output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        **config.sampling,
    }
    if config.backend is Backend.CHAT:
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    if config.ignore_eos:
        payload["ignore_eos"] = True
    return payload


def _chunk_text(data: dict[str, Any], backend: Backend) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    if backend is Backend.COMPLETIONS:
        return choices[0].get("text") or ""
    delta = choices[0].get("delta") or {}
    # Reasoning models stream their thinking first; it is output the server had to generate.
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


async def _sse_payloads(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The ``data:`` fields of a server-sent event stream, one per event line."""
    async for raw in response.content:
        line = raw.decode("utf-8").strip()
        if line.startswith("data:"):
            yield line[len("data:"):].strip()


async def send_request(session: aiohttp.ClientSession, config: ServeConfig,
                       request: SampleRequest, bench_start: float) -> RequestResult:
    result = RequestResult(prompt_len=request.prompt_len)
    start = time.perf_counter()
    result.start_time = start - bench_start
    try:
        async with session.post(config.api_url, json=build_payload(config, request)) as response:
            if response.status != 200:
                body = (await response.text())[:_ERROR_TEXT_LIMIT]
                result.error = f"HTTP {response.status}: {body}"
            else:
                await _read_stream(response, config.backend, result, start)
    except Exception as exc:  # any transport failure is a failed request, never a crash
        result.error = f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT_LIMIT]
    result.latency = time.perf_counter() - start
    if result.error:
        result.success = False
    elif result.ttft == 0.0:  # only usage, no visible text: the first token is the last event
        result.ttft = result.latency
    return result


async def _read_stream(response: aiohttp.ClientResponse, backend: Backend,
                       result: RequestResult, start: float) -> None:
    last_chunk = start
    text_parts: list[str] = []
    async for payload in _sse_payloads(response):
        now = time.perf_counter()  # arrival time, before any parsing
        if payload == "[DONE]":
            result.success = True
            break
        data = json.loads(payload)
        if data.get("error"):
            result.error = f"stream error: {json.dumps(data['error'])[:_ERROR_TEXT_LIMIT]}"
            return
        if text := _chunk_text(data, backend):
            if not text_parts:
                result.ttft = now - start
            else:
                result.itl.append(now - last_chunk)
            last_chunk = now
            text_parts.append(text)
        usage = data.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            result.output_tokens = int(usage["completion_tokens"])
    result.generated_text = "".join(text_parts)
    if not result.success:
        result.error = "stream ended without [DONE]"


# --------------------------------------------------------------------------------------------
# the run


async def arrivals(requests: list[SampleRequest], rate: float, burstiness: float,
                   rng: np.random.Generator) -> AsyncIterator[SampleRequest]:
    """Yield requests on a gamma-process schedule (mean gap 1/rate, shape ``burstiness``)."""
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}")
    due = time.perf_counter()
    for request in requests:
        yield request
        if math.isinf(rate):
            continue
        # Sleep to an absolute due time so the loop's own overhead doesn't lower the rate.
        due += float(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)))
        await asyncio.sleep(max(0.0, due - time.perf_counter()))


async def run_benchmark(config: ServeConfig,
                        requests: list[SampleRequest]) -> tuple[list[RequestResult], float]:
    """Send every request; return their results (in dataset order) and the wall duration."""
    semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)
    timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S)
    rng = np.random.default_rng(config.seed)
    with tqdm(total=len(requests), disable=config.disable_tqdm) as pbar:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         read_bufsize=_READ_BUFSIZE) as session:
            bench_start = time.perf_counter()

            async def one(request: SampleRequest) -> RequestResult:
                if semaphore is None:
                    result = await send_request(session, config, request, bench_start)
                else:
                    async with semaphore:
                        result = await send_request(session, config, request, bench_start)
                pbar.update(1)
                return result

            tasks = [asyncio.create_task(one(request)) async for request in
                     arrivals(requests, config.request_rate, config.burstiness, rng)]
            results = list(await asyncio.gather(*tasks))
            duration = time.perf_counter() - bench_start
    return results, duration


async def served_models(models_url: str) -> list[dict[str, Any]]:
    """The entries of GET /v1/models: ``id``, and ``root`` (the checkpoint path) if the server says."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.get(models_url) as response:
            response.raise_for_status()
            data = await response.json()
    return data.get("data") or []


async def resolve_model_and_tokenizer(base_url: str, model: str | None,
                                      tokenizer: str | None) -> tuple[str, str]:
    """(model name for requests, tokenizer path): asks the server only for what it must."""
    roots: dict[str, str | None] = {}
    if model is None or (tokenizer is None and not os.path.isdir(model)):
        try:
            roots = {e["id"]: e.get("root") for e in await served_models(f"{base_url}/v1/models")}
        except Exception as exc:
            if model is None:
                raise SystemExit(f"bench serve: no --model given and GET {base_url}/v1/models "
                                 f"failed: {type(exc).__name__}: {exc}") from exc
        if model is None:
            if not roots:
                raise SystemExit(f"bench serve: {base_url}/v1/models lists no models")
            model = next(iter(roots))
            print(f"Model from {base_url}/v1/models: {model}")
    if tokenizer is not None:
        return model, tokenizer
    root = roots.get(model)
    # A local checkpoint folder holds the tokenizer; otherwise try it as a hub id in the HF cache.
    return model, root if root and os.path.isdir(root) else model


def load_tokenizer(path: str, trust_remote_code: bool) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                             local_files_only=not os.path.isdir(path))
    except Exception as exc:
        raise SystemExit(f"bench serve: cannot load a tokenizer from {path!r} "
                         f"({type(exc).__name__}: {exc}); pass --tokenizer PATH, a Hugging Face "
                         "tokenizer folder") from exc


def count_missing_output_tokens(results: list[RequestResult], tokenizer: Tokenizer) -> None:
    """Servers that send no usage chunk: count the streamed text with the tokenizer."""
    for result in results:
        if result.success and result.output_tokens is None:
            result.output_tokens = len(tokenizer.encode(result.generated_text,
                                                        add_special_tokens=False))


# --------------------------------------------------------------------------------------------
# entry point


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_main_async(args))


async def _main_async(args: argparse.Namespace) -> int:
    backend = _BACKEND_ALIASES[args.backend]
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    model, tokenizer_path = await resolve_model_and_tokenizer(base_url, args.model, args.tokenizer)
    tokenizer = load_tokenizer(tokenizer_path, args.trust_remote_code)
    requests = sample_requests(DatasetConfig.from_args(args), tokenizer)
    selected = parse_metric_names(args.percentile_metrics)
    percentiles = parse_percentiles(args.metric_percentiles)
    config = _serve_config(args, backend, base_url, args.served_model_name or model)

    print(f"Benchmarking {config.api_url}: {len(requests)} requests, "
          f"request rate {config.request_rate}, burstiness {config.burstiness}, "
          f"max concurrency {config.max_concurrency}")
    results, duration = await run_benchmark(config, requests)
    count_missing_output_tokens(results, tokenizer)
    metrics = compute_metrics(results, duration, percentiles)
    _print_errors(metrics)
    print(format_report(metrics, config.request_rate, config.max_concurrency, selected))
    if args.save_result:
        path = save_result(args, config, tokenizer_path, metrics, selected, results)
        print(f"Result written to {path}")
    return 0


def _serve_config(args: argparse.Namespace, backend: Backend, base_url: str,
                  model: str) -> ServeConfig:
    sampling: dict[str, float | int] = {"temperature": args.temperature}
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    if args.top_k is not None:
        sampling["top_k"] = args.top_k
    return ServeConfig(
        backend=backend,
        api_url=base_url + (args.endpoint or backend.default_endpoint),
        model=model,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        disable_tqdm=args.disable_tqdm,
        sampling=sampling,
    )


def _print_errors(metrics: BenchmarkMetrics) -> None:
    if not metrics.errors:
        return
    # Group by kind, not by text: a server's message names the request's own numbers ("the
    # prompt has 541 tokens"), so six refusals of one kind would print as six distinct errors.
    kinds: Counter[str] = Counter()
    example: dict[str, str] = {}
    for text, count in metrics.errors.items():
        kind = error_kind(text)
        kinds[kind] += count
        example.setdefault(kind, text)
    print(f"{metrics.failed} requests failed; most common errors:", file=sys.stderr)
    for kind, count in kinds.most_common(3):
        print(f"  {count} x {kind}, e.g. {example[kind]}", file=sys.stderr)


def error_kind(text: str) -> str:
    """``HTTP 400: {"error": {"code": "context_length_exceeded", ...}}`` -> ``HTTP 400
    context_length_exceeded``; the OpenAI error's code, else its type; other texts as they are."""
    status, sep, body = text.partition(": ")
    if not sep or not status.startswith("HTTP "):
        return text
    try:
        error = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        return status
    label = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
    return f"{status} {label}" if label else status


def save_result(args: argparse.Namespace, config: ServeConfig, tokenizer_path: str,
                metrics: BenchmarkMetrics, selected: list[MetricName],
                results: list[RequestResult]) -> str:
    now = datetime.now()
    rate = config.request_rate if math.isfinite(config.request_rate) else "inf"
    record: dict[str, Any] = {
        "date": now.strftime("%Y%m%d-%H%M%S"),
        "backend": config.backend.value,
        "api_url": config.api_url,
        "model_id": config.model,
        "tokenizer_id": tokenizer_path,
        "num_prompts": len(results),
        "request_rate": rate,
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "config": _jsonable_args(args),
        **metrics_to_dict(metrics, selected),
        **_per_request_lists(results),
    }
    filename = args.result_filename or _default_filename(config, rate, now)
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        filename = os.path.join(args.result_dir, filename)
    with open(filename, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return filename


def _per_request_lists(results: list[RequestResult]) -> dict[str, list[Any]]:
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [(r.output_tokens or 0) if r.success else 0 for r in results],
        "ttfts": [r.ttft if r.success else 0.0 for r in results],
        "itls": [r.itl if r.success else [] for r in results],
        "e2els": [r.latency if r.success else 0.0 for r in results],
        "start_times": [r.start_time for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
    }


def _jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if callable(value):
            continue
        out[key] = "inf" if isinstance(value, float) and math.isinf(value) else value
    return out


def _default_filename(config: ServeConfig, rate: float | str, now: datetime) -> str:
    concurrency = f"-concurrency{config.max_concurrency}" if config.max_concurrency else ""
    model = os.path.basename(config.model.rstrip("/")) or "model"
    return f"{config.backend.value}-{rate}qps{concurrency}-{model}-{now:%Y%m%d-%H%M%S}.json"
