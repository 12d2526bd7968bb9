"""Tensor parallelism on GPUs (NCCL): TP=2 computes what TP=1 computes, eagerly and under CUDA graphs.

Tiny checkpoints in float32 (the Triton kernels take fp32 with IEEE dots, so TP=1 and TP=2 differ
only by the order of the all-reduce's sums), run through the whole engine: greedy tokens must be
equal, and the logprobs of every prompt token and every sampled token close. Dense ERNIE and
ERNIE MoE, the MoE both with experts split by rows and with expert parallelism. Each TP=2 engine
also runs its decode steps from CUDA graphs that contain the all-reduces and all-gathers; the graph
run must give the eager run's tokens, and logprobs within 1e-4 (a padded batch may pick other GEMM
kernels).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 GPUs")]

MAX_TOKENS = 24


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 200, (n,), generator=gen).tolist()
    return [torch.randint(10, vocab, (k,), generator=gen).tolist() for k in lens]


@pytest.fixture(scope="module", params=["tiny-ernie-4.5", "tiny-ernie-4.5-moe"])
def checkpoint(request, tmp_path_factory):
    from ernieserve.checkpoint.dummy import write_dummy_checkpoint

    return write_dummy_checkpoint(request.param, tmp_path_factory.mktemp(request.param), dtype="float32")


_RUN_ENGINE = """
import faulthandler, json, sys
import torch
# every process (this one and the spawned workers, which re-run this module's top level) prints
# its threads' stacks if the engine hangs, before the test's timeout kills it
faulthandler.dump_traceback_later(150, exit=True)
from ernieserve import LLM, SamplingParams

if __name__ == "__main__":
    path, out, kw, prompts, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
    llm = LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=16, block_size=16,
              num_gpu_blocks_override=512, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    used_graphs = llm.llm_engine.core.runner.graphs is not None
    tokens = [o.outputs[0].token_ids for o in outs]
    sampled = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    prompt = [[lp[t].logprob for t, lp in zip(p[1:], o.prompt_logprobs[1:])] for p, o in zip(prompts, outs)]
    json.dump({"tokens": tokens, "sampled": sampled, "prompt": prompt, "graphs": used_graphs}, open(out, "w"))
    llm.llm_engine.core.shutdown()
"""


_RESULTS: dict[str, tuple] = {}  # the TP=1 reference is shared by the tp and tp-ep cases


def _run(path, **kw) -> tuple[list[list[int]], list[list[float]], list[list[float]], bool]:
    """(tokens, sampled logprobs, prompt logprobs) per prompt, and whether CUDA graphs ran.

    Each engine runs in a fresh process (as `ernieserve` does): NCCL groups and CUDA graph pools
    are not torn down and rebuilt inside one process, and a hang fails the test after a timeout
    instead of stalling the suite."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    import time

    key = json.dumps([str(path), kw], sort_keys=True)
    if key in _RESULTS:
        return _RESULTS[key]
    with tempfile.TemporaryDirectory() as tmp:
        script, out = os.path.join(tmp, "run_engine.py"), os.path.join(tmp, "out.json")
        with open(script, "w") as f:
            f.write(_RUN_ENGINE)  # a file, not -c: spawned TP workers re-import the main module by path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, script, str(path), out, json.dumps(kw),
                                   json.dumps(_prompts(12, 4000)), str(MAX_TOKENS)],
                                  capture_output=True, text=True, timeout=180, env=env)
        except subprocess.TimeoutExpired as e:
            log = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            # the stacks faulthandler printed for every process (rank 0 and the workers) are in it
            pytest.fail(f"engine {kw} did not finish in {e.timeout} s; its log ends:\n{log[-12000:]}")
        print(f"engine {path.name} {kw}: {time.perf_counter() - start:.1f} s", flush=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.load(open(out))
    _RESULTS[key] = r["tokens"], r["sampled"], r["prompt"], r["graphs"]
    return _RESULTS[key]


def _close(a: list[list[float]], b: list[list[float]], atol: float) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=atol, rtol=0)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "tp-ep"])
def test_tp2_matches_tp1(checkpoint, expert_parallel):
    if expert_parallel and "moe" not in checkpoint.name:
        pytest.skip("expert parallelism needs experts")
    ref_tokens, ref_sampled, ref_prompt, _ = _run(checkpoint, enforce_eager=True)
    eager = _run(checkpoint, enforce_eager=True, tensor_parallel_size=2, enable_expert_parallel=expert_parallel)
    graphs = _run(checkpoint, tensor_parallel_size=2, enable_expert_parallel=expert_parallel)
    assert graphs[3], "the TP=2 engine must capture CUDA graphs (with the all-reduces inside)"
    assert eager[0] == ref_tokens, "TP=2 greedy tokens differ from TP=1"
    _close(eager[1], ref_sampled, 1e-3)
    _close(eager[2], ref_prompt, 1e-3)
    assert graphs[0] == eager[0], "TP=2 under CUDA graphs differs from TP=2 eager"
    _close(graphs[1], eager[1], 1e-4)
