"""What runs between two decode-graph replays, and that the token streams do not depend on it.

A decode step's graph resolves its in-flight input ids itself (kernels/step_feed.py), from the
`sampled` buffer that the previous replay's race wrote and that the decode and mixed-step graphs
share; the pending step keeps a view of that buffer instead of a copy, and all of a step's inputs,
block table included, go up in one copy (worker/cuda_graph.py, PackedInputs). A wrong feed source,
a stale buffer or a missing copy on a rare path (after an eager step, a full-sampler step, a
preemption) shows as a token stream that differs from the eager engine's. These runs drive the
engine step by step with requests joining at set steps and finishing at different lengths, so
batches cross graph sizes (1, 2, 4, 8, 16), with mixed prefill+decode steps from graphs or eager
between decode steps, prefix-cache hits, seeded sampling and full-sampler rows. float32, so that
a padded batch's other GEMM kernels cannot flip a near-tie.

The last test counts the runtime calls of batch-1 decode steps under torch.profiler: one graph
launch, one upload and one download a step, no eager kernel.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def ernie_03b(tmp_path_factory):
    from ernieserve.checkpoint.dummy import write_dummy_checkpoint

    return write_dummy_checkpoint("ernie-4.5-0.3b", tmp_path_factory.mktemp("e03b"), dtype="bfloat16")


def _arrivals(vocab: int, full_sampler: bool) -> list[tuple[int, str, list[int], object]]:
    """(engine step to add it at, request id, prompt, params): 26 requests, at most 16 running, a
    third of them sharing a 100-token prefix (prefix-cache hits), greedy and seeded rows, lengths
    1 to 40 tokens; with full_sampler every fifth request needs the full sampler (top_k)."""
    from ernieserve import SamplingParams

    gen = torch.Generator().manual_seed(7)
    shared = torch.randint(10, vocab, (100,), generator=gen).tolist()
    at = [0] + [3] * 2 + [6] * 5 + [10] * 9 + [24] * 5 + [40] * 3 + [41]
    out = []
    for i, step in enumerate(at):
        own = torch.randint(10, vocab, (int(torch.randint(1, 160, (1,), generator=gen)),), generator=gen).tolist()
        prompt = shared + own if i % 3 == 0 else own
        max_tokens = 1 if i == 5 else 2 + (i * 7) % 39
        if full_sampler and i % 5 == 4:
            params = SamplingParams(temperature=0.9, top_k=20, seed=300 + i, max_tokens=max_tokens, ignore_eos=True)
        elif i % 2:
            params = SamplingParams(temperature=0.8, seed=100 + i, max_tokens=max_tokens, ignore_eos=True)
        else:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        out.append((step, f"req-{i}", prompt, params))
    return out


_EAGER: dict[str, tuple] = {}


def _stream(ckpt, arrivals, monkeypatch, **kw) -> tuple[dict[str, list[int]], dict, int, bool]:
    """Every request's tokens, the step kinds, the preemptions, and whether graphs were captured."""
    from ernieserve import LLM

    monkeypatch.setenv("ERNIESERVE_STEP_STATS", "1")
    llm = LLM(model=str(ckpt), dtype="float32", max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=256,
              seed=0, **kw)
    engine = llm.llm_engine
    todo, tokens, step = list(arrivals), {}, 0
    while todo or engine.has_unfinished_requests():
        while todo and todo[0][0] <= step:
            _, rid, prompt, params = todo.pop(0)
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
        assert step < 2000, "the engine does not finish"
    core = engine.core
    result = tokens, core.step_stats.as_dict(), core.scheduler.num_preempted_total, core.runner.graphs is not None
    del llm, engine, core
    torch.cuda.empty_cache()
    return result


def _compare(ckpt, monkeypatch, full_sampler: bool = False, blocks: int | None = None, **graph_kw):
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    arrivals = _arrivals(vocab - 10, full_sampler)
    common = {} if blocks is None else dict(num_gpu_blocks_override=blocks)
    key = json.dumps([str(ckpt), full_sampler, blocks])
    if key not in _EAGER:
        _EAGER[key] = _stream(ckpt, arrivals, monkeypatch, enforce_eager=True, **common)
    eager = _EAGER[key]
    graphed = _stream(ckpt, arrivals, monkeypatch, **common, **graph_kw)
    assert graphed[3], "CUDA graphs must be captured"
    assert len(graphed[0]) == len(arrivals)
    kinds = graphed[1]
    assert kinds.get("decode-graph", {}).get("steps", 0) > 0, kinds
    for rid in graphed[0]:
        assert graphed[0][rid] == eager[0][rid], f"{rid}: graphs {graphed[0][rid]} vs eager {eager[0][rid]}"
    return graphed, eager


@pytest.mark.parametrize("mixed", ["graph", "eager"])
def test_streams_with_joins_and_finishes_equal_eager(ernie_03b, monkeypatch, mixed):
    """Decode graphs of every size, with mixed steps between them from graphs (sharing the sampled
    buffer: no copies) or eager (the decode graph then copies the eager step's ids in)."""
    graphed, _ = _compare(ernie_03b, monkeypatch,
                          graph_optimization_config=json.dumps({"cudagraph_mixed_steps": mixed == "graph"}))
    kinds = graphed[1]
    assert kinds.get("mixed-graph" if mixed == "graph" else "mixed", {}).get("steps", 0) > 0, kinds


def test_full_sampler_rows_between_graph_steps(ernie_03b, monkeypatch):
    """top_k rows: those steps' ids come from the sampler, not the graphs' buffer (a copy before
    the next replay), the graph's race still overwriting the buffer."""
    _compare(ernie_03b, monkeypatch, full_sampler=True)


def test_preemption_with_tokens_in_flight(ernie_03b, monkeypatch):
    graphed, eager = _compare(ernie_03b, monkeypatch, blocks=16)
    assert graphed[2] > 0 and eager[2] > 0, "the case must preempt"


def test_moe_model_streams_equal_eager(checkpoint_factory, monkeypatch):
    _compare(checkpoint_factory("tiny-ernie-4.5-moe"), monkeypatch,
             graph_optimization_config=json.dumps({"cudagraph_mixed_steps": True}))


# ---- what a decode step issues between replays --------------------------------------------------

_LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel")
_MEMSET = ("cudaMemset", "cuMemset")
_COPY = ("cudaMemcpy", "cuMemcpy")


def test_batch1_decode_step_is_one_replay_one_upload_one_download(ernie_03b):
    """Steady batch-1 greedy decoding: per engine step one cudaGraphLaunch, one host-to-device
    copy (every input and the block table) and one device-to-host copy (the sampled id), and no
    kernel launched outside the graph (no clone of the ids, no eager feed)."""
    from torch.profiler import ProfilerActivity, profile

    from ernieserve import LLM, SamplingParams

    llm = LLM(model=str(ernie_03b), dtype="bfloat16", max_model_len=2048, max_num_seqs=8)
    engine = llm.llm_engine
    engine.add_request("0", {"prompt_token_ids": list(range(100, 140))},
                       SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    for _ in range(8):  # the prefill and a few decode steps: the pinned-memory cache is warm
        engine.step()
    steps = 12
    torch.cuda.synchronize()  # the device's copies in the window are the window's steps' only
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events())
    graph_launches = sum(n for k, n in names.items() if "GraphLaunch" in k)
    launches = {k: n for k, n in names.items() if k.startswith(_LAUNCH)}
    memsets = {k: n for k, n in names.items() if k.startswith(_MEMSET)}
    copies = sum(n for k, n in names.items() if k.startswith(_COPY))
    htod = sum(n for k, n in names.items() if k.startswith("Memcpy HtoD"))  # the device's side
    dtoh = sum(n for k, n in names.items() if k.startswith("Memcpy DtoH"))
    summary = {k: n for k, n in names.items() if k.startswith(("cuda", "cu", "Memcpy", "Memset"))}
    print(f"\n{steps} decode steps: {summary}")
    runner = engine.core.runner
    assert runner.graphs is not None
    assert graph_launches == steps, summary
    assert not launches and not memsets, summary
    assert copies == 2 * steps, summary
    if htod or dtoh:  # device-side activity recorded
        assert htod == steps and dtoh == steps, summary
    del llm, engine
    torch.cuda.empty_cache()


# ---- tensor parallelism: rank 0's ids reach every rank's graph buffer ---------------------------

_RUN_TP = """
import faulthandler, json, sys
faulthandler.dump_traceback_later(170, exit=True)
from ernieserve import LLM, SamplingParams

if __name__ == "__main__":
    path, out, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8, block_size=16,
              num_gpu_blocks_override=512, tensor_parallel_size=2, **kw)
    prompts = [{"prompt_token_ids": [10 + i, 20 + 3 * i] + list(range(30, 30 + 7 * i))} for i in range(12)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=None if i % 2 else 50 + i,
                             max_tokens=3 + 2 * i, ignore_eos=True) for i in range(12)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    json.dump({"tokens": [o.outputs[0].token_ids for o in outs],
               "graphs": llm.llm_engine.core.runner.graphs is not None}, open(out, "w"))
    llm.llm_engine.core.shutdown()
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_graph_feed_equals_eager(checkpoint_factory, tmp_path):
    """TP=2, greedy and seeded rows, no logprobs: the graphs sample, rank 0 broadcasts its ids in
    place into the graphs' buffer, and every rank's next replay feeds from it."""
    import os
    import subprocess
    import sys

    ckpt = checkpoint_factory("tiny-ernie-4.5")
    script = tmp_path / "run_tp.py"
    script.write_text(_RUN_TP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    results = []
    for kw in ({"enforce_eager": True}, {}):
        out = tmp_path / f"out{len(results)}.json"
        proc = subprocess.run([sys.executable, str(script), str(ckpt), str(out), json.dumps(kw)],
                              capture_output=True, text=True, timeout=200, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(out.read_text()))
    eager, graphed = results
    assert graphed["graphs"] and not eager["graphs"]
    assert graphed["tokens"] == eager["tokens"]
