"""Executors: how the engine core runs the model on its devices.

`UniProcExecutor` is one `ModelRunner` in this process. `MultiprocExecutor` runs tensor-parallel
rank 0 here, in the engine core process beside the scheduler, and ranks 1..N-1 in worker
processes (worker/worker_proc.py), one per device; ranks on other nodes are started there by
`ernieserve serve --node-rank K`. Every step's `SchedulerOutput` (a diff) goes to every worker over
the step channel (distributed/channel.py) before rank 0 runs the same step; all ranks run the same
`ModelRunner` code on their slice of the model, so their collectives line up, and rank 0's
sampled tokens are broadcast to the others on the device (model_runner.py). Only rank 0's output
reaches the scheduler.

A rank that dies or fails takes the engine down with a message naming it: a monitor thread
watches local workers' processes and every worker's heartbeat and reports the first failure to
`on_fatal` (the engine core process sends it to the API server and exits: its main thread may be
blocked in a collective that will never finish). Without `on_fatal` (the offline `LLM`), the
failure is raised from the next `execute_model`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import threading
import time
from abc import ABC, abstractmethod
from typing import Callable

import torch
import zmq

from ernieserve.config import EngineConfig
from ernieserve.core.scheduler import ModelRunnerOutput, SchedulerOutput
from ernieserve.distributed.channel import (HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, ControlTag, Deadline,
                                            Rank0Channel, StepTag)
from ernieserve.distributed.parallel_state import (abort_tp_group, create_store, destroy_tp_group, init_tp_group,
                                                   rank_device)
from ernieserve.distributed.placement import describe_layout
from ernieserve.worker.model_runner import ModelRunner
from ernieserve.worker.worker_proc import CONFIG_KEY, WorkerSpec, config_fingerprint, cpu_threads_per_rank, run_worker

logger = logging.getLogger(__name__)

# Rendezvous and collective timeout: loading a large model on one rank while another already waits
# in the first collective must not trip it.
DIST_TIMEOUT_S = 1800.0
# How long a failed step waits for the monitor to name a dead rank before re-raising as is.
_FAILURE_GRACE_S = 3.0
_TEARDOWN_S = 15.0  # the longest shutdown waits for the process group to go

FatalHandler = Callable[[str], None]


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank died or failed; the engine cannot continue."""


class Executor(ABC):
    runner: ModelRunner  # rank 0's, in this process

    @abstractmethod
    def initialize_kv_cache(self) -> int:
        """Size and allocate the KV cache on every rank; the block count all ranks can hold."""

    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Launch this step on every rank; the previous step's results (ModelRunner semantics)."""

    @property
    def has_pending(self) -> bool:
        return self.runner.has_pending

    @property
    def num_host_blocks(self) -> int:
        return self.runner.num_host_blocks

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    def model_param_bytes(self) -> int:
        """Weight bytes on one device (rank 0's; the ranks hold equal shares up to rounding)."""
        return self.runner.model_param_bytes()

    def decode_weight_bytes(self) -> int:
        """Weight bytes a batch-1 decode step reads on one device (rank 0's)."""
        return self.runner.decode_weight_bytes()

    def shutdown(self) -> None:
        """Stop the workers; idempotent."""


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config, local_rank=config.parallel.device_index(0))

    def initialize_kv_cache(self) -> int:
        return self.runner.initialize_kv_cache()

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(sched)


def make_executor(config: EngineConfig, on_fatal: FatalHandler | None = None) -> Executor:
    par = config.parallel
    if par.tensor_parallel_size > 1 or par.data_parallel_size > 1:
        logger.info("Parallel layout: %s", describe_layout(par))
    if par.tensor_parallel_size == 1:
        return UniProcExecutor(config)
    return MultiprocExecutor(config, on_fatal)


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, on_fatal: FatalHandler | None = None) -> None:
        par = config.parallel
        if par.node_rank != 0:
            raise ValueError("the executor runs on node 0; other nodes run worker_proc.run_node_workers")
        self.config = config
        self.world = par.tensor_parallel_size
        self.device = rank_device(config.device.device, par.device_index(0))
        self._on_fatal = on_fatal
        self._failure: str | None = None
        self._closed = False
        self._ready: dict[int, str] = {}  # worker rank -> its READY text ("param_bytes num_blocks")
        self._hello: set[int] = set()
        self._cond = threading.Condition()
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads_per_rank(par))
        multi_node = par.nnodes > 1
        # one node: loopback and a free port; several: every interface, node 0's advertised address
        port = par.master_port + par.data_parallel_rank if par.master_port is not None else 0
        host = par.master_addr if multi_node else "127.0.0.1"
        self.store = create_store(host, port, self.world, True, DIST_TIMEOUT_S)
        self.ctx = zmq.Context()
        self.channel = Rank0Channel(self.ctx, list(range(1, self.world)), "*" if multi_node else host, host)
        self.channel.addresses.publish(self.store)
        self.store.set(CONFIG_KEY, config_fingerprint(config))  # other nodes check they run the same engine
        self.local_ranks = list(par.node_ranks(0))[1:]
        self.procs = self._spawn_local_workers(host, self.store.port)
        self._monitor = threading.Thread(target=self._monitor_loop, name="ernieserve-tp-monitor", daemon=True)
        self._monitor.start()
        atexit.register(self.shutdown)
        try:
            # every rank said hello (and checked its flags) before this one blocks in the rendezvous
            remote = sorted(set(range(1, self.world)) - set(self.local_ranks))
            if remote:
                logger.info("waiting for tensor-parallel ranks %s on the other nodes to connect to %s:%d",
                            remote, host, self.store.port)
            self._wait_for(lambda: len(self._hello) == self.world - 1, "to connect")
            tp = init_tp_group(self.store, 0, self.world, self.device, DIST_TIMEOUT_S)
            self.runner = ModelRunner(config, tp=tp, local_rank=par.device_index(0))
        except BaseException as e:
            try:
                self._raise_failure(e)
            finally:
                self.shutdown()
            raise

    def _spawn_local_workers(self, master_addr: str, store_port: int) -> list[multiprocessing.process.BaseProcess]:
        ctx = multiprocessing.get_context("spawn")
        procs = []
        for rank in self.local_ranks:
            spec = WorkerSpec(self.config, rank, self.config.parallel.device_index(rank), master_addr, store_port,
                              os.getpid(), logging.getLogger().getEffectiveLevel(), DIST_TIMEOUT_S)
            # daemonic: never outlives this process, and multiprocessing's exit hook does not wait on it
            proc = ctx.Process(target=run_worker, args=(spec,), name=f"ernieserve-tp-rank{rank}", daemon=True)
            proc.start()
            procs.append(proc)
        logger.info("started tensor-parallel workers for ranks %s (pids %s)", self.local_ranks,
                    [p.pid for p in procs])
        return procs

    # ---- the Executor interface ---------------------------------------------------------------
    def initialize_kv_cache(self) -> int:
        try:
            num_blocks = self.runner.initialize_kv_cache()  # every rank takes the minimum over ranks
            self._wait_for(lambda: len(self._ready) == self.world - 1, "to size their KV caches")
        except BaseException as e:
            self._raise_failure(e)
            raise
        own = self.runner.model_param_bytes()
        sizes = [own] + [int(self._ready[r].split()[0]) for r in range(1, self.world)]
        logger.info("Weights per rank: %s", ", ".join(f"rank {r} {_size(b)}" for r, b in enumerate(sizes)))
        return num_blocks

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._check_failure()
        lost = self.channel.send_step(StepTag.EXECUTE, sched)  # before rank 0 starts: the workers run alongside
        if lost:
            error = WorkerDiedError(f"tensor-parallel worker ranks {lost} are not connected to the step channel")
            self._raise_failure(error)  # the monitor's diagnosis, when it has one
            raise error
        try:
            out = self.runner.execute_model(sched)
        except BaseException as e:
            self._raise_failure(e)
            raise
        self._check_failure()  # a collective aborted under us may have returned garbage
        return out

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.channel.send_step(StepTag.SHUTDOWN, timeout_ms=200)  # dead workers are skipped
        except zmq.ZMQError:
            pass
        deadline = time.monotonic() + 10.0
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()  # workers ignore SIGTERM (it may be meant for the whole process group)
                proc.join(5)
            if proc.is_alive():  # stuck in the driver, unkillable for now: do not wait on it at exit
                logger.error("tensor-parallel worker pid %d did not exit; leaving it", proc.pid)
                multiprocessing.process._children.discard(proc)  # multiprocessing's exit hook joins without a timeout
        self._monitor.join(2)
        if getattr(self, "runner", None) is not None:  # absent when the start failed
            # they hold captured NCCL kernels: gone before the communicator (a teardown with such graphs
            # alive hangs: pytorch/pytorch#115388)
            self.runner.release_graphs()
        # bounded: a communicator teardown that waits on peers which already exited must not hang
        # the caller (seen on GPUs: a TP=2 engine with decode graphs did not exit); abort, not
        # destroy, on NCCL: it never waits on peers, and frees the slot for a new process group
        teardown = threading.Thread(target=abort_tp_group if self.device.type == "cuda" else destroy_tp_group,
                                    name="ernieserve-tp-teardown", daemon=True)
        teardown.start()
        teardown.join(_TEARDOWN_S)
        if teardown.is_alive():
            logger.error("the tensor-parallel process group did not tear down within %.0f s; going on without it",
                         _TEARDOWN_S)
        self.channel.close()
        self.ctx.term()

    # ---- failures -----------------------------------------------------------------------------
    def _check_failure(self) -> None:
        if self._failure is not None:
            raise WorkerDiedError(self._failure)

    def _raise_failure(self, cause: BaseException) -> None:
        """After rank 0 failed: if a worker's death explains it, raise that instead."""
        if isinstance(cause, WorkerDiedError) and self._failure is not None:
            return
        deadline = time.monotonic() + _FAILURE_GRACE_S
        while self._failure is None and time.monotonic() < deadline and not self._closed:
            time.sleep(0.05)
        if self._failure is not None:
            raise WorkerDiedError(self._failure) from cause

    def _wait_for(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DIST_TIMEOUT_S
        with self._cond:
            while not done():
                self._check_failure()
                if time.monotonic() > deadline:
                    done_ranks = self._hello if what == "to connect" else set(self._ready)
                    missing = sorted(set(range(1, self.world)) - done_ranks)
                    raise WorkerDiedError(f"tensor-parallel ranks {missing} did not {what.removeprefix('to ')} "
                                          f"within {DIST_TIMEOUT_S:.0f} s")
                self._cond.wait(0.2)

    def _fail(self, message: str) -> None:
        with self._cond:
            if self._failure is not None or self._closed:
                return
            self._failure = message
            self._cond.notify_all()
        logger.error("%s; the engine stops", message)
        for proc in self.procs:  # the survivors cannot continue without the lost rank
            if proc.is_alive():
                proc.kill()
        if self._on_fatal is not None:
            self._on_fatal(message)
        elif self.device.type == "cuda":
            abort_tp_group()  # NCCL would wait for the dead rank forever; gloo raises by itself

    # ---- the monitor thread -------------------------------------------------------------------
    def _monitor_loop(self) -> None:
        remote = set(range(1, self.world)) - set(self.local_ranks)
        beats: dict[int, Deadline] = {}
        last_beat = 0.0
        while not self._closed:
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_INTERVAL_S:
                self.channel.beat()
                last_beat = now
            try:
                msg = self.channel.recv_control(100)
            except zmq.ZMQError:
                return  # closed under us at shutdown
            if msg is not None:
                self._on_control(*msg, beats)
            for rank, proc in zip(self.local_ranks, self.procs):
                if not proc.is_alive() and not self._closed:
                    self._fail(f"tensor-parallel worker rank {rank} (pid {proc.pid}) died unexpectedly "
                               f"(exit code {proc.exitcode})")
            for rank in remote & set(beats):
                silent = beats[rank].silent_for()
                if silent > HEARTBEAT_TIMEOUT_S:
                    node = rank // self.config.parallel.ranks_per_node
                    self._fail(f"tensor-parallel worker rank {rank} on node {node} stopped responding "
                               f"(no heartbeat for {silent:.0f} s)")
            if self._failure is not None:
                return

    def _on_control(self, tag: ControlTag, rank: int, text: str, beats: dict[int, Deadline]) -> None:
        beats.setdefault(rank, Deadline()).touch()
        if tag is ControlTag.ERROR:
            self._fail(f"tensor-parallel worker rank {rank} failed: {text}")
            return
        with self._cond:
            if tag is ControlTag.HELLO:
                self._hello.add(rank)
            elif tag is ControlTag.READY:
                self._ready[rank] = text
            self._cond.notify_all()


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"
