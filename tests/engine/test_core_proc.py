"""The engine core process over its ZMQ protocol: readiness, outputs, per-request rejection,
aborts that free blocks at once, no busy spin when idle, clean shutdown, startup failures, and
no orphan when its parent dies."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from ernieserve.config import EngineArgs
from ernieserve.engine.core_proc import EngineAddresses, InputTag, OutputTag, run_engine_core
from ernieserve.engine.protocol import (AbortRequests, EngineDead, EngineError, EngineOutputs, EngineReady,
                                        EngineRequest, FinishReason)
from ernieserve.sampling_params import SamplingParams

pytestmark = pytest.mark.slow  # each engine process loads torch and the model

REPO = Path(__file__).resolve().parents[2]


class EngineHandle:
    """The front end's side of the protocol, synchronously."""

    def __init__(self, config, addresses: EngineAddresses | None = None) -> None:
        self.addresses = addresses or EngineAddresses.create()
        self.ctx = zmq.Context()
        self.inp = self.ctx.socket(zmq.PUSH)
        self.inp.bind(self.addresses.input)
        self.out = self.ctx.socket(zmq.PULL)
        self.out.bind(self.addresses.output)
        self.proc = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(config, self.addresses, os.getpid()))
        self.proc.start()

    def recv(self, timeout_s: float = 60.0):
        assert self.out.poll(int(timeout_s * 1000)), "no message from the engine"
        tag, body = self.out.recv_multipart()
        kind = {OutputTag.READY.value: EngineReady, OutputTag.OUTPUTS.value: EngineOutputs,
                OutputTag.REQUEST_ERROR.value: EngineError, OutputTag.DEAD.value: EngineDead}[tag]
        return msgspec.msgpack.decode(body, type=kind)

    def send(self, tag: InputTag, msg=None) -> None:
        self.inp.send_multipart([tag.value, msgspec.msgpack.encode(msg) if msg is not None else b""])

    def add(self, rid: str, ids: list[int], max_tokens: int = 4) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.send(InputTag.ADD, EngineRequest(request_id=rid, prompt_token_ids=ids, sampling_params=params,
                                              arrival_time=time.time()))

    def collect(self, until_finished: set[str], timeout_s: float = 60.0) -> tuple[dict, list, EngineOutputs]:
        tokens: dict[str, list[int]] = {}
        finish: dict[str, FinishReason] = {}
        errors = []
        last = None
        deadline = time.monotonic() + timeout_s
        while not until_finished <= set(finish) | {e.request_id for e in errors}:
            assert time.monotonic() < deadline
            msg = self.recv()
            if isinstance(msg, EngineError):
                errors.append(msg)
                continue
            assert isinstance(msg, EngineOutputs)
            last = msg
            for o in msg.outputs:
                tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finish_reason is not None:
                    finish[o.request_id] = o.finish_reason
        return {rid: (tokens.get(rid, []), finish.get(rid)) for rid in until_finished}, errors, last

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self.inp.close(0)
        self.out.close(0)
        self.ctx.term()


def config_for(model: Path, **overrides):
    kwargs = dict(model=str(model), device="cpu", max_model_len=128, block_size=16, num_gpu_blocks_override=32)
    return EngineArgs(**{**kwargs, **overrides}).create_engine_config()


@pytest.fixture(scope="module")
def engine(tiny_ernie):
    handle = EngineHandle(config_for(tiny_ernie))
    ready = handle.recv(120)
    assert isinstance(ready, EngineReady)
    assert (ready.num_gpu_blocks, ready.block_size, ready.max_model_len) == (32, 16, 128)
    assert ready.pid == handle.proc.pid
    yield handle
    handle.send(InputTag.SHUTDOWN)
    handle.proc.join(30)
    code = handle.proc.exitcode
    handle.close()
    assert code == 0


def test_requests_produce_outputs_with_stats(engine):
    engine.add("a", [5, 6, 7], max_tokens=5)
    engine.add("b", [8, 9], max_tokens=3)
    results, errors, last = engine.collect({"a", "b"})
    assert not errors
    assert len(results["a"][0]) == 5 and results["a"][1] == FinishReason.LENGTH
    assert len(results["b"][0]) == 3
    stats = last.scheduler_stats
    assert stats.num_running_reqs == 0 and stats.num_free_blocks == stats.num_total_blocks == 32


def test_rejected_request_gets_an_error_and_nothing_else_is_affected(engine):
    engine.add("good", [5, 6, 7], max_tokens=4)
    engine.add("too-long", list(range(5, 200)), max_tokens=4)  # past max_model_len: the engine's own guard
    engine.add("bad-token", [5, 10**9])
    engine.add("good-2", [9, 9, 9], max_tokens=4)
    results, errors, _ = engine.collect({"good", "too-long", "bad-token", "good-2"})
    assert {e.request_id for e in errors} == {"too-long", "bad-token"}
    assert "max_model_len" in next(e.message for e in errors if e.request_id == "too-long")
    assert len(results["good"][0]) == 4 and len(results["good-2"][0]) == 4


def test_abort_frees_blocks_at_once(engine):
    engine.add("long", [5, 6, 7], max_tokens=120)
    first = engine.recv()
    assert isinstance(first, EngineOutputs)
    engine.send(InputTag.ABORT, AbortRequests(["long", "never-existed"]))
    while True:
        msg = engine.recv()
        aborted = [o for o in msg.outputs if o.finish_reason == FinishReason.ABORT]
        if aborted:
            break
    assert [o.request_id for o in aborted] == ["long"]
    assert msg.scheduler_stats.num_running_reqs == 0
    assert msg.scheduler_stats.num_free_blocks == 32


def test_first_scheduled_time_reported_once(engine):
    before = time.time()
    engine.add("timed", [5, 6, 7], max_tokens=3)
    seen = {}
    done = False
    while not done:
        msg = engine.recv()
        for rid, when in msg.first_scheduled.items():
            assert rid not in seen
            seen[rid] = when
        done = any(o.request_id == "timed" and o.finish_reason is not None for o in msg.outputs)
    assert before <= seen["timed"] <= time.time()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_engine_does_not_spin(engine):
    start = _cpu_seconds(engine.proc.pid)
    time.sleep(1.5)
    assert _cpu_seconds(engine.proc.pid) - start < 0.2


def test_startup_failure_is_reported(tiny_ernie, tmp_path):
    broken = tmp_path / "no-weights"
    broken.mkdir()
    for f in tiny_ernie.iterdir():
        if "safetensors" not in f.name:
            (broken / f.name).symlink_to(f)
    handle = EngineHandle(config_for(broken))
    try:
        msg = handle.recv(120)
        assert isinstance(msg, EngineDead) and msg.during_startup
        assert "no *.safetensors weight files" in msg.message
        handle.proc.join(30)
        assert handle.proc.exitcode == 1
    finally:
        handle.close()


def test_sigterm_finishes_running_requests_then_exits(tiny_ernie):
    handle = EngineHandle(config_for(tiny_ernie), EngineAddresses.create(*_two_free_ports()))
    try:
        assert isinstance(handle.recv(120), EngineReady)
        handle.add("r", [5, 6, 7], max_tokens=30)
        first = handle.recv()
        assert isinstance(first, EngineOutputs)
        handle.proc.terminate()  # SIGTERM
        results, errors, _ = handle.collect({"r"})
        num_first = sum(len(o.new_token_ids) for o in first.outputs)
        assert num_first + len(results["r"][0]) == 30 and results["r"][1] == FinishReason.LENGTH
        handle.proc.join(30)
        assert handle.proc.exitcode == 0
    finally:
        handle.close()


def _two_free_ports() -> tuple[int, int]:
    import socket

    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return a.getsockname()[1], b.getsockname()[1]


_ORPHAN_PARENT = textwrap.dedent("""
    import os, sys, time, multiprocessing, zmq
    from ernieserve.config import EngineArgs
    from ernieserve.engine.core_proc import EngineAddresses, run_engine_core
    if __name__ == "__main__":
        config = EngineArgs(model=sys.argv[1], device="cpu", max_model_len=64, block_size=16,
                            num_gpu_blocks_override=8).create_engine_config()
        addresses = EngineAddresses.create()
        ctx = zmq.Context()
        inp = ctx.socket(zmq.PUSH); inp.bind(addresses.input)
        out = ctx.socket(zmq.PULL); out.bind(addresses.output)
        proc = multiprocessing.get_context("spawn").Process(target=run_engine_core,
                                                              args=(config, addresses, os.getpid()))
        proc.start()
        out.recv_multipart()  # ready
        print(proc.pid, flush=True)
        os._exit(0)  # die without stopping the engine
""")


def test_engine_exits_when_its_parent_dies(tiny_ernie):
    r = subprocess.run([sys.executable, "-c", _ORPHAN_PARENT, str(tiny_ernie)], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    engine_pid = int(r.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(engine_pid):
        time.sleep(0.2)
    assert not _alive(engine_pid), "the engine core outlived its parent"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
