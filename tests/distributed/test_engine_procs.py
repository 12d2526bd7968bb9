"""Parallel engines as processes: a tensor-parallel rank that dies, data-parallel replicas behind
one front end, and a tensor-parallel group spread over two "hosts" (two process trees on loopback).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ernieserve.config import EngineArgs
from ernieserve.engine.async_client import AsyncLLM, EngineDeadError

pytestmark = pytest.mark.slow  # engine core and worker processes each import torch and load a model

REPO = Path(__file__).resolve().parents[2]
GREEDY = dict(temperature=0.0, ignore_eos=True)


def _children(pid: int) -> list[int]:
    """Child processes of pid, but multiprocessing's resource tracker."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"resource_tracker" not in cmdline:
                out.append(int(entry))
    return out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_tokens(model: Path, prompts: list[str], max_tokens: int) -> list[list[int]]:
    from ernieserve import LLM, SamplingParams

    llm = LLM(model=str(model), device="cpu", max_model_len=256, block_size=16, num_gpu_blocks_override=64)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, **GREEDY), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


async def _tokens(llm: AsyncLLM, rid: str, prompt: str, max_tokens: int) -> list[int]:
    from ernieserve.sampling_params import SamplingParams

    tokens: list[int] = []
    async for out in llm.generate(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), rid):
        tokens.extend(out.outputs[0].token_ids)
    return tokens


def test_dead_worker_takes_the_engine_down_with_a_clear_error(tiny_ernie):
    config = EngineArgs(model=str(tiny_ernie), device="cpu", max_model_len=256, block_size=16,
                        num_gpu_blocks_override=64, tensor_parallel_size=2).create_engine_config()
    expected = _reference_tokens(tiny_ernie, ["the quick brown fox"], 8)

    async def run() -> None:
        llm = AsyncLLM(config, log_requests=False)
        await llm.start()
        try:
            # the two-rank engine behind the API server's client serves what one rank serves
            assert await _tokens(llm, "warm", "the quick brown fox", 8) == expected[0]
            workers = _children(llm.engine_pid)
            assert len(workers) == 1, f"expected one tensor-parallel worker, found {workers}"
            from ernieserve.sampling_params import SamplingParams

            stream = llm.generate("a long one", SamplingParams(max_tokens=200, **GREEDY), "long")
            await stream.__anext__()  # running
            os.kill(workers[0], signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(EngineDeadError) as info:
                async for _ in stream:
                    pass
            assert time.monotonic() - killed < 10, "the engine took too long to report the dead rank"
            assert "tensor-parallel worker rank 1" in str(info.value) and "died" in str(info.value)
            assert not llm.is_alive and "rank 1" in (llm.dead_reason or "")
            with pytest.raises(EngineDeadError):
                llm.add_request("after", "hi", SamplingParams(max_tokens=2))
            deadline = time.monotonic() + 10
            while not _gone(llm.engine_pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert _gone(llm.engine_pid), "the engine core process did not exit"
        finally:
            await llm.shutdown()

    asyncio.run(run())


def test_dead_worker_offline_raises_naming_the_rank(tiny_ernie):
    """The offline engine (rank 0 in this process): the step in flight raises, naming the rank."""
    import threading

    from ernieserve import LLM, SamplingParams
    from ernieserve.worker.executor import WorkerDiedError

    llm = LLM(model=str(tiny_ernie), device="cpu", tensor_parallel_size=2, max_model_len=512, block_size=16,
              num_gpu_blocks_override=64)
    try:
        workers = _children(os.getpid())
        assert len(workers) == 1
        threading.Timer(1.0, os.kill, (workers[0], signal.SIGKILL)).start()
        with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) died unexpectedly \(exit code -9\)"):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=480, **GREEDY), use_tqdm=False)
        with pytest.raises(WorkerDiedError):  # and stays down
            llm.generate("more", SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.llm_engine.core.shutdown()


def test_data_parallel_replicas_share_the_load(tiny_ernie):
    config = EngineArgs(model=str(tiny_ernie), device="cpu", max_model_len=512, block_size=16,
                        num_gpu_blocks_override=96, data_parallel_size=2).create_engine_config()
    prompts = [f"prompt number {i} says" for i in range(6)]
    expected = _reference_tokens(tiny_ernie, prompts, 6)

    async def run() -> None:
        from ernieserve.sampling_params import SamplingParams

        llm = AsyncLLM(config, log_requests=False)
        ready = await llm.start()
        try:
            assert len(set(llm.engine_pids)) == 2 and ready.num_gpu_blocks == 2 * 96
            got = await asyncio.gather(*(_tokens(llm, f"r{i}", p, 6) for i, p in enumerate(prompts)))
            assert list(got) == expected
            queried = [rep.stats.prefix_cache_queries for rep in llm._replicas]
            assert all(q > 0 for q in queried), f"a replica got no work: prompt tokens looked up {queried}"
            # a long request holds replica 0; the next goes to replica 1, and its abort must reach it
            first = llm.generate("keep going", SamplingParams(max_tokens=480, **GREEDY), "hold")
            await first.__anext__()
            second = llm.generate("and another", SamplingParams(max_tokens=480, **GREEDY), "cut")
            await second.__anext__()
            holder, cut = llm._replica_of["0-hold"], llm._replica_of["0-cut"]
            assert holder is not cut
            await second.aclose()  # leaving the stream aborts the request
            deadline = time.monotonic() + 10
            while cut.stats.num_running_reqs and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert cut.stats.num_running_reqs == 0 and holder.stats.num_running_reqs == 1
            assert "0-cut" not in llm._replica_of and not cut.unfinished
            await first.aclose()
        finally:
            await llm.shutdown()

    asyncio.run(run())


def _start_node1(model: Path, port: int, max_model_len: int = 256) -> subprocess.Popen:
    args = ["--model", str(model), "--device", "cpu", "--max-model-len", str(max_model_len), "--block-size", "16",
            "--num-gpu-blocks-override", "64", "-tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--node-rank", "1"]
    return subprocess.Popen([sys.executable, "-m", "ernieserve", "serve", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_two_nodes_on_loopback(tiny_ernie):
    """Node 1 is `ernieserve serve --node-rank 1` in its own process tree; node 0 (rank 0, the
    scheduler) is an offline engine in this process. TP=2, one rank per node, gloo."""
    from ernieserve import LLM, SamplingParams
    from ernieserve.worker.executor import WorkerDiedError

    node_kwargs = dict(device="cpu", max_model_len=256, block_size=16, num_gpu_blocks_override=64,
                       tensor_parallel_size=2, nnodes=2, node_rank=0, master_addr="127.0.0.1")
    # a node started with other flags is refused at once, naming the flag
    port = _free_port()
    node1 = _start_node1(tiny_ernie, port, max_model_len=128)
    try:
        with pytest.raises(WorkerDiedError, match="rank 1 failed: .*--max-model-len 128 here, 256 on node 0"):
            LLM(model=str(tiny_ernie), master_port=port, **node_kwargs)
        log, _ = node1.communicate(timeout=30)
        assert node1.returncode != 0, log
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()

    port = _free_port()
    node1 = _start_node1(tiny_ernie, port)
    try:
        prompts = ["the quick brown fox", "hello there"]
        expected = _reference_tokens(tiny_ernie, prompts, 8)
        llm = LLM(model=str(tiny_ernie), master_port=port, **node_kwargs)
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        llm.llm_engine.core.shutdown()
        log, _ = node1.communicate(timeout=30)
        assert node1.returncode == 0, log
        assert "node 1 of 2: starting tensor-parallel ranks [1]" in log
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()


def test_shutdown_never_hangs_on_the_process_group_teardown(tiny_ernie, monkeypatch, caplog):
    """A teardown that never returns (seen with NCCL and captured graphs) costs a bounded wait."""
    import logging
    import threading

    from ernieserve import LLM
    from ernieserve.distributed.parallel_state import destroy_tp_group
    from ernieserve.worker import executor as executor_mod

    llm = LLM(model=str(tiny_ernie), device="cpu", tensor_parallel_size=2, max_model_len=256, block_size=16,
              num_gpu_blocks_override=32)
    release = threading.Event()
    monkeypatch.setattr(executor_mod, "destroy_tp_group", lambda: release.wait(60))
    monkeypatch.setattr(executor_mod, "_TEARDOWN_S", 0.5)
    start = time.monotonic()
    try:
        with caplog.at_level(logging.ERROR, logger="ernieserve.worker.executor"):
            llm.llm_engine.core.shutdown()
        assert time.monotonic() - start < 8.0
        assert any("did not tear down within" in r.getMessage() for r in caplog.records)
        assert not _children(os.getpid()), "the worker outlived the shutdown"
    finally:
        release.set()
        destroy_tp_group()  # the real teardown, for the tests after this one
