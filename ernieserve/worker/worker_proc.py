"""A tensor-parallel worker process (ranks 1..N-1), and the launcher of a non-zero node's workers.

A worker joins the process group, builds the same `ModelRunner` as rank 0 on its own device and
slice of the model, sizes its KV cache (all ranks agree on the smallest block count), then runs
every step rank 0 sends it, until SHUTDOWN. It keeps no scheduler: the step's `SchedulerOutput`
says everything, and the tokens it samples are overwritten by rank 0's on the device.

It never outlives rank 0: a health thread exits the process when rank 0's heartbeats stop (or, on
rank 0's node, when its parent process is gone). A worker's own failure is reported to rank 0
(ERROR, with the exception) before it exits, so the engine names the rank and the cause.

Other nodes: `ernieserve serve --nnodes N --node-rank K --master-addr A ...` (or the same command
with `--ips`) calls `run_node_workers`, which starts node K's ranks and waits for them; it serves no
HTTP and runs no scheduler.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import zmq

from ernieserve.config import EngineConfig, ParallelConfig
from ernieserve.distributed.channel import (HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, ChannelAddresses, ControlTag,
                                            Deadline, StepTag, WorkerChannel, send_control)
from ernieserve.distributed.parallel_state import create_store, destroy_tp_group, init_tp_group, rank_device

if TYPE_CHECKING:
    from ernieserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_STEP_POLL_MS = 1000


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    config: EngineConfig
    rank: int
    local_rank: int  # device index on this node
    master_addr: str  # the rendezvous store's host
    store_port: int
    parent_pid: int  # the process that started this one (rank 0, or a node launcher)
    log_level: int
    timeout_s: float


CONFIG_KEY = "ernieserve/config"


def config_fingerprint(config: EngineConfig) -> str:
    """What every rank must agree on; a node started with other flags is refused, naming them."""
    m, c, s, d, p = config.model, config.cache, config.scheduler, config.device, config.parallel
    quant = m.quant_config.describe() if m.quant_config is not None else None
    model = f"{m.architecture}, {m.num_layers} layers, vocabulary {m.vocab_size}"  # paths may differ per node
    fields = {"--model": model, "--dtype": str(m.dtype), "--load-format": m.load_format, "--seed": m.seed,
              "--quantization": quant, "--max-model-len": s.max_model_len, "--max-num-seqs": s.max_num_seqs,
              "--max-num-batched-tokens": s.max_num_batched_tokens, "--block-size": c.block_size,
              "--num-gpu-blocks-override": c.num_gpu_blocks_override, "--swap-space": c.swap_space_gb,
              "--enable-prefix-caching": c.enable_prefix_caching, "--enforce-eager": d.enforce_eager,
              "--tensor-parallel-size": p.tensor_parallel_size, "--enable-expert-parallel": p.enable_expert_parallel,
              "--nnodes": p.nnodes}
    return "\n".join(f"{k}={v}" for k, v in fields.items())


def _check_same_config(store: object, config: EngineConfig, node_rank: int) -> None:
    theirs = store.get(CONFIG_KEY).decode()  # type: ignore[attr-defined]
    mine = config_fingerprint(config)
    if theirs != mine:
        diff = [f"{a.split('=')[0]} {a.split('=', 1)[1]} here, {b.split('=', 1)[1]} on node 0"
                for a, b in zip(mine.splitlines(), theirs.splitlines()) if a != b]
        raise ValueError(f"node {node_rank} was started with other engine flags than node 0: {'; '.join(diff)}")


def cpu_threads_per_rank(parallel: ParallelConfig) -> int:
    """CPU ranks of one node share its cores (gloo ranks each spinning all cores would thrash)."""
    per_node = parallel.ranks_per_node * parallel.data_parallel_size
    return max(1, (os.cpu_count() or 1) // per_node)


def run_worker(spec: WorkerSpec) -> None:
    """Entry point of a spawned worker process."""
    logging.basicConfig(level=spec.log_level, stream=sys.stderr, datefmt="%H:%M:%S",
                        format=f"%(asctime)s %(levelname)s %(name)s [tp rank {spec.rank}]: %(message)s")
    # Ctrl-C, and a SIGTERM sent to the whole group (systemd, `kill -- -PGID`), reach the workers
    # too; rank 0 decides when they stop (after draining), and kills them outright if it must
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = spec.config
    device = rank_device(config.device.device, spec.local_rank)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_rank(config.parallel))
    ctx = zmq.Context()
    world = config.parallel.tensor_parallel_size
    try:
        store = create_store(spec.master_addr, spec.store_port, world, False, spec.timeout_s)
        channel = WorkerChannel(ctx, spec.rank, ChannelAddresses.lookup(store, spec.rank))
    except BaseException:  # no channel to report on: the log and the exit code are all rank 0 gets
        logger.error("cannot reach rank 0 at %s:%d:\n%s", spec.master_addr, spec.store_port, traceback.format_exc())
        os._exit(1)
    local_to_parent = spec.parent_pid == os.getppid()
    threading.Thread(target=_health_loop, args=(channel, spec.parent_pid if local_to_parent else None),
                     name="ernieserve-tp-health", daemon=True).start()
    code = 0
    try:
        _check_same_config(store, config, config.parallel.node_rank)
        channel.send(ControlTag.HELLO)
        tp = init_tp_group(store, spec.rank, world, device, spec.timeout_s)
        from ernieserve.worker.model_runner import ModelRunner

        runner = ModelRunner(config, tp=tp, local_rank=spec.local_rank)
        num_blocks = runner.initialize_kv_cache()
        channel.send(ControlTag.READY, f"{runner.model_param_bytes()} {num_blocks}")
        _step_loop(channel, runner)
    except BaseException as e:  # anything: rank 0 must hear which rank failed and why
        logger.error("worker failed:\n%s", traceback.format_exc())
        text = str(e).strip()
        channel.send_final(ControlTag.ERROR, f"{type(e).__name__}: {text}" if text else type(e).__name__)
        code = 1
    channel.close()  # no ctx.term(): the health thread still holds its sockets; os._exit ends them
    if code == 0 and device.type != "cuda":
        destroy_tp_group()  # gloo; an NCCL teardown could wait on rank 0, which only joins us
    # os._exit: skip interpreter teardown, where a communicator whose peers are gone may block
    os._exit(code)


def _step_loop(channel: WorkerChannel, runner: ModelRunner) -> None:
    while True:
        msg = channel.recv_step(_STEP_POLL_MS)
        if msg is None:
            continue  # the health thread watches rank 0 meanwhile
        tag, sched = msg
        if tag is StepTag.SHUTDOWN:
            logger.info("shutting down")
            return
        runner.execute_model(sched)  # rank 0 keeps the outputs


def _health_loop(channel: WorkerChannel, parent_pid: int | None) -> None:
    """Beat to rank 0; exit the process when rank 0 (or the parent on its node) is gone."""
    sub, push = channel.health_sockets()
    rank0 = Deadline()
    while True:
        send_control(push, ControlTag.BEAT, channel.rank)
        if sub.poll(int(HEARTBEAT_INTERVAL_S * 1000)):
            while sub.poll(0):
                sub.recv()
            rank0.touch()
        gone = None
        if parent_pid is not None and os.getppid() != parent_pid:
            gone = "its parent process exited"
        elif rank0.silent_for() > HEARTBEAT_TIMEOUT_S:
            gone = f"rank 0 sent no heartbeat for {rank0.silent_for():.0f} s"
        if gone:
            logger.error("tensor-parallel worker rank %d exits: %s", channel.rank, gone)
            os._exit(1)


# ---- nodes 1..N-1 -----------------------------------------------------------------------------------

def run_node_workers(config: EngineConfig) -> int:
    """Start this node's ranks and wait for them; the exit code is the first failure's, else 0."""
    par = config.parallel
    assert par.node_rank > 0 and par.master_port is not None
    ranks = list(par.node_ranks())
    logger.info("node %d of %d: starting tensor-parallel ranks %s; rank 0 at %s:%d", par.node_rank, par.nnodes,
                ranks, par.master_addr, par.master_port)
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for rank in ranks:
        from ernieserve.worker.executor import DIST_TIMEOUT_S

        spec = WorkerSpec(config, rank, par.device_index(rank), par.master_addr, par.master_port, os.getpid(),
                          logging.getLogger().getEffectiveLevel(), DIST_TIMEOUT_S)
        proc = ctx.Process(target=run_worker, args=(spec,), name=f"ernieserve-tp-rank{rank}", daemon=True)
        proc.start()
        procs.append(proc)
    code = 0
    try:
        for rank, proc in zip(ranks, procs):
            proc.join()
            if proc.exitcode and not code:
                code = proc.exitcode if proc.exitcode > 0 else 1
                logger.error("tensor-parallel rank %d exited with code %s", rank, proc.exitcode)
                _terminate(procs)  # the others cannot go on without it
    except KeyboardInterrupt:
        logger.info("interrupted: stopping this node's workers")
        _terminate(procs)
        code = 130
    logger.info("node %d: all workers exited", par.node_rank)
    return code


def _terminate(procs: list[multiprocessing.process.BaseProcess]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()  # workers ignore SIGTERM
    for proc in procs:
        proc.join(5)
