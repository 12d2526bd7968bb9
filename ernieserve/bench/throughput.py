"""`ernieserve bench throughput`: offline throughput of the `LLM` API on a fixed request set.

All prompts go to one ``llm.generate`` call as token ids (exact lengths, no tokenizer round trip),
each with ``ignore_eos=True`` and ``max_tokens`` = its output length, so every request generates
exactly the tokens asked for. Sampling is temperature 1.0 / top_p 1.0 by default, as in vLLM's
`bench throughput`: the run exercises the sampler the way production traffic does, and with
``ignore_eos`` the token counts don't depend on what is sampled. ``--temperature 0`` measures the
greedy path instead.

Engine flags given on the command line reach ``LLM(...)`` as keyword arguments with underscores;
flags left out are not passed, so the engine's own defaults apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ernieserve.bench.datasets import (
    DatasetConfig, SampleRequest, Tokenizer, add_dataset_args, sample_requests,
)
from ernieserve.engine.step_stats import report_step_stats
from ernieserve.sampling_params import SamplingParams

# the benchmark's own flags of the same names: --model (required here) and --seed (the dataset's)
_OWN_FLAGS = ("--model", "--seed")


class OfflineLLM(Protocol):
    """The part of ``ernieserve.LLM`` this benchmark uses."""

    def generate(self, prompts: Any, sampling_params: Any, use_tqdm: bool = ...) -> list[Any]: ...

    def get_tokenizer(self) -> Tokenizer: ...


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Every engine flag the server takes (EngineArgs), as in `vllm bench`; each reaches LLM(...)
    only when given."""
    from ernieserve.config import EngineArgs

    EngineArgs.add_cli_args(parser, skip=_OWN_FLAGS, only_when_given=True,
                            title="engine (the server's engine flags, passed to LLM(...) when given)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags the user gave, as LLM keyword arguments."""
    import dataclasses

    from ernieserve.config import EngineArgs

    own = {f.lstrip("-").replace("-", "_") for f in _OWN_FLAGS}
    names = {f.name for f in dataclasses.fields(EngineArgs)} - own
    return {name: value for name, value in vars(args).items() if name in names}


def create_llm(args: argparse.Namespace) -> OfflineLLM:
    from ernieserve import LLM  # heavy import, deferred so `--help` stays fast

    return LLM(model=args.model, **engine_kwargs(args))


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local checkpoint folder")
    parser.add_argument("--input-len", type=int, default=None,
                        help="overrides --random-input-len")
    parser.add_argument("--output-len", type=int, default=None,
                        help="overrides --random-output-len")
    add_dataset_args(parser)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--output-json", default=None, help="write the results here")
    parser.add_argument("--disable-tqdm", action="store_true")
    add_engine_args(parser)


@dataclass(slots=True)
class ThroughputResult:
    num_requests: int
    elapsed_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    def report(self) -> str:
        return "\n".join([
            f"Throughput: {self.requests_per_s:.2f} requests/s, "
            f"{self.total_tokens_per_s:.2f} total tokens/s, "
            f"{self.output_tokens_per_s:.2f} output tokens/s",
            f"Total num prompt tokens:  {self.prompt_tokens}",
            f"Total num output tokens:  {self.output_tokens}",
            f"Elapsed time (s):         {self.elapsed_s:.2f}",
        ])

    def to_dict(self) -> dict[str, float | int]:
        return {
            "elapsed_time": self.elapsed_s,
            "num_requests": self.num_requests,
            "total_prompt_tokens": self.prompt_tokens,
            "total_output_tokens": self.output_tokens,
            "total_num_tokens": self.prompt_tokens + self.output_tokens,
            "requests_per_second": self.requests_per_s,
            "tokens_per_second": self.total_tokens_per_s,
            "output_tokens_per_second": self.output_tokens_per_s,
        }


def dataset_config(args: argparse.Namespace) -> DatasetConfig:
    config = DatasetConfig.from_args(args)
    if args.input_len is not None:
        config = dataclasses.replace(config, random_input_len=args.input_len)
    if args.output_len is not None:
        config = dataclasses.replace(config, random_output_len=args.output_len)
    return config


def run_throughput(llm: OfflineLLM, requests: list[SampleRequest], temperature: float,
                   use_tqdm: bool = True) -> ThroughputResult:
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [
        SamplingParams(temperature=temperature, top_p=1.0, ignore_eos=True,
                       max_tokens=r.expected_output_len)
        for r in requests
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start
    return ThroughputResult(
        num_requests=len(requests),
        elapsed_s=elapsed,
        prompt_tokens=sum(len(out.prompt_token_ids) for out in outputs),
        output_tokens=sum(len(c.token_ids) for out in outputs for c in out.outputs),
    )


def main(args: argparse.Namespace, llm: OfflineLLM | None = None) -> int:
    """``llm`` lets tests (and callers holding an engine) skip building one from ``--model``."""
    llm = llm if llm is not None else create_llm(args)
    requests = sample_requests(dataset_config(args), llm.get_tokenizer(), token_mode=True)
    result = run_throughput(llm, requests, args.temperature, use_tqdm=not args.disable_tqdm)
    print(result.report())
    stats = report_step_stats(llm)
    if stats is not None:  # ERNIESERVE_STEP_STATS=1
        print(stats)
    if args.output_json:
        record = {**result.to_dict(), "model": args.model, "engine_kwargs": engine_kwargs(args)}
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return 0
