"""The engine core in its own process: a busy loop around `EngineCore.step()` behind two ZMQ sockets.

    front end ──PUSH──► input socket  (ADD EngineRequest | ABORT AbortRequests | SHUTDOWN)
    front end ◄──PULL── output socket (READY EngineReady | OUTPUTS EngineOutputs
                                       | REQUEST_ERROR EngineError | DEAD EngineDead)

Each message is two frames: a tag, then the msgspec-msgpack body. The front end binds both
sockets (it outlives the engine and knows the addresses before spawning it); this process
connects. The loop drains every pending input, runs one step while there is work, sends the
step's outputs, and blocks on the input socket when idle, so an idle engine costs no CPU.

The process ignores SIGINT (Ctrl-C reaches the whole process group; the API server decides when
the engine stops, after in-flight requests finish) and treats SIGTERM as "finish what is running,
then exit". It also exits when its parent disappears, so a killed server leaves no orphan.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from ernieserve.config import EngineConfig
from ernieserve.engine.protocol import (AbortRequests, EngineDead, EngineError, EngineOutputs, EngineReady,
                                        EngineRequest)

logger = logging.getLogger(__name__)

# How often a blocked, idle engine wakes to check that its parent is still alive.
_IDLE_POLL_MS = 1000


class InputTag(bytes, enum.Enum):
    ADD = b"add"
    ABORT = b"abort"
    SHUTDOWN = b"shutdown"


class OutputTag(bytes, enum.Enum):
    READY = b"ready"
    OUTPUTS = b"out"
    REQUEST_ERROR = b"err"
    DEAD = b"dead"


@dataclass(frozen=True, slots=True)
class EngineAddresses:
    input: str  # front end -> engine
    output: str  # engine -> front end

    @classmethod
    def create(cls, input_port: int | None = None, output_port: int | None = None) -> "EngineAddresses":
        """tcp on 127.0.0.1 when ports are given (FastDeploy's --engine-worker-queue-port /
        --cache-queue-port), otherwise private ipc sockets in the temp folder."""
        if input_port is not None:
            out = output_port if output_port is not None else input_port + 1
            return cls(f"tcp://127.0.0.1:{input_port}", f"tcp://127.0.0.1:{out}")
        base = os.path.join(tempfile.gettempdir(), f"ernieserve-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        return cls(f"ipc://{base}-in", f"ipc://{base}-out")

    def ipc_paths(self) -> list[str]:
        return [a.removeprefix("ipc://") for a in (self.input, self.output) if a.startswith("ipc://")]

    def for_replica(self, index: int) -> "EngineAddresses":
        """Data-parallel replica `index`'s pair: replica 0 uses these; replica i > 0 the ipc paths
        with an `-{i}` suffix, or the tcp ports output + 2i - 1 and output + 2i."""
        if index == 0:
            return self
        if self.output.startswith("tcp://"):
            host, port = self.output.rsplit(":", 1)
            return EngineAddresses(f"{host}:{int(port) + 2 * index - 1}", f"{host}:{int(port) + 2 * index}")
        return EngineAddresses(f"{self.input}-{index}", f"{self.output}-{index}")


def run_engine_core(config: EngineConfig, addresses: EngineAddresses, parent_pid: int,
                    log_level: int = logging.INFO) -> None:
    """Entry point of the spawned engine core process."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 0)  # never block the step loop on a slow front end
    out.setsockopt(zmq.LINGER, 5000)
    out.connect(addresses.output)
    encoder = msgspec.msgpack.Encoder()
    try:
        from ernieserve.engine.core import EngineCore

        core = EngineCore(config, on_fatal=lambda message: _die_now(addresses, message))
    except BaseException as e:  # anything at all: the parent must hear why, not just an exit code
        logger.error("engine core failed to start:\n%s", traceback.format_exc())
        out.send_multipart([OutputTag.DEAD.value, encoder.encode(EngineDead(_describe(e), True))])
        out.close()
        ctx.term()
        sys.exit(1)
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.LINGER, 0)
    inp.connect(addresses.input)
    loop = EngineCoreLoop(core, inp, out, parent_pid)
    signal.signal(signal.SIGTERM, loop.on_sigterm)
    sched = config.scheduler
    out.send_multipart([OutputTag.READY.value, encoder.encode(EngineReady(
        os.getpid(), core.num_blocks, config.cache.block_size, sched.max_model_len,
        sched.max_num_seqs, sched.max_num_batched_tokens))])
    code = loop.run()
    core.shutdown()
    inp.close()
    out.close()
    ctx.term()
    sys.exit(code)


def _die_now(addresses: EngineAddresses, message: str) -> None:
    """A tensor-parallel rank died (called from the executor's monitor thread). The main thread may
    be blocked in a collective that will never complete, so tell the front end from this thread,
    through a context of its own (its term() waits until the message is out, up to the linger),
    and exit without unwinding."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(addresses.output)
    sock.send_multipart([OutputTag.DEAD.value, msgspec.msgpack.encode(EngineDead(message, False))])
    sock.close()
    ctx.term()
    logging.shutdown()
    os._exit(1)


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class EngineCoreLoop:
    def __init__(self, core: Any, inp: zmq.Socket, out: zmq.Socket, parent_pid: int) -> None:
        self.core = core
        self.inp = inp
        self.out = out
        self.parent_pid = parent_pid
        self.encoder = msgspec.msgpack.Encoder()
        self.decoders = {InputTag.ADD.value: msgspec.msgpack.Decoder(EngineRequest),
                         InputTag.ABORT.value: msgspec.msgpack.Decoder(AbortRequests)}
        self.poller = zmq.Poller()
        self.poller.register(inp, zmq.POLLIN)
        self.shutdown_requested = False
        self.stop_when_idle = False
        # requests added but not yet seen running: their first-scheduled time feeds queue-time metrics
        self.not_yet_scheduled: set[str] = set()

    def on_sigterm(self, signum: int, frame: Any) -> None:
        logger.info("SIGTERM: finishing running requests, then exiting")
        self.stop_when_idle = True

    def run(self) -> int:
        try:
            while not self.shutdown_requested:
                busy = self.core.has_unfinished_requests()
                if not busy and (self.stop_when_idle or not self._wait_for_input()):
                    break
                if busy and not self._parent_alive():  # one cheap syscall a step: no orphan ever runs on
                    logger.warning("the API server process is gone; engine core exiting")
                    break
                self._drain_inputs()
                if self.core.has_unfinished_requests():
                    self._step()
        except Exception as e:  # a bug in the step: tell the front end, so it fails requests, not hangs
            logger.error("engine core loop failed:\n%s", traceback.format_exc())
            self._send(OutputTag.DEAD, EngineDead(_describe(e), False))
            return 1
        logger.info("engine core loop stopped")
        return 0

    def _parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    def _wait_for_input(self) -> bool:
        """Block until a message arrives; False if the engine should stop instead."""
        while True:
            if self.poller.poll(_IDLE_POLL_MS):
                return True
            if not self._parent_alive():
                logger.warning("the API server process is gone; engine core exiting")
                return False
            if self.stop_when_idle:
                return False

    def _drain_inputs(self) -> None:
        aborted = []
        while not self.shutdown_requested:
            try:
                tag, body = self.inp.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if tag == InputTag.SHUTDOWN.value:
                self.shutdown_requested = True
            elif tag == InputTag.ABORT.value:
                ids = self._decode(tag, body)
                if ids is not None:
                    self.not_yet_scheduled.difference_update(ids.request_ids)
                    aborted.extend(self.core.abort_requests(ids.request_ids))
            elif tag == InputTag.ADD.value:
                self._add(body)
            else:
                logger.error("unknown message tag %r ignored", tag)
        if aborted:
            # tell the front end at once: the freed blocks show in the stats
            self._send(OutputTag.OUTPUTS, EngineOutputs(outputs=aborted, scheduler_stats=self.core.scheduler.stats(),
                                                        timestamp=time.time()))

    def _decode(self, tag: bytes, body: bytes) -> Any:
        try:
            return self.decoders[tag].decode(body)
        except msgspec.MsgspecError as e:
            logger.error("undecodable %s message ignored: %s", tag.decode(), e)
            return None

    def _add(self, body: bytes) -> None:
        req = self._decode(InputTag.ADD.value, body)
        if req is None:
            return
        try:
            self.core.add_request(req)
        except ValueError as e:  # only this request is refused; the loop goes on
            self._send(OutputTag.REQUEST_ERROR, EngineError(req.request_id, str(e)))
            return
        self.not_yet_scheduled.add(req.request_id)

    def _step(self) -> None:
        started = time.time()
        outputs: EngineOutputs = self.core.step()
        if self.not_yet_scheduled:
            outputs.first_scheduled = self._newly_scheduled(outputs, started)
        self._send(OutputTag.OUTPUTS, outputs)

    def _newly_scheduled(self, outputs: EngineOutputs, started: float) -> dict[str, float]:
        # a request that finished within its first step is no longer in `running`: check outputs too
        ids = [r.request_id for r in self.core.scheduler.running] + [o.request_id for o in outputs.outputs]
        seen = {rid: started for rid in ids if rid in self.not_yet_scheduled}
        self.not_yet_scheduled.difference_update(seen)
        return seen

    def _send(self, tag: OutputTag, msg: Any) -> None:
        self.out.send_multipart([tag.value, self.encoder.encode(msg)], copy=False)
