"""`AsyncLLM`: the API server's handle on an engine core running in its own process.

It starts the core process (spawn), binds the two ZMQ sockets the core connects to, and runs
one output-handler task that reads the core's messages, detokenizes them with the shared
`OutputProcessor` and puts each request's `RequestOutput`s on that request's asyncio queue.
Callers never wait on the engine directly, and the engine never waits on them.

Engine death (a DEAD message, or the process sentinel firing) fails every pending request with
`EngineDeadError` and makes `is_alive` false, which the server reports on /health.

Data parallelism (`--data-parallel-size N`): N engine core processes, each with its own socket
pair and output-handler task; a new request (all its n samples) goes to the replica with the
fewest unfinished requests, and its aborts follow it there. The replicas' scheduler stats are
summed for the metrics. Any replica's death is the engine's death.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections.abc import AsyncIterator
import dataclasses
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from ernieserve.config import EngineConfig
from ernieserve.engine.core_proc import EngineAddresses, InputTag, OutputTag, run_engine_core
from ernieserve.engine.protocol import (AbortRequests, EngineDead, EngineError, EngineOutputs, EngineReady,
                                        SchedulerStats)
from ernieserve.frontend.output_processor import OutputKind, OutputProcessor, child_request_id
from ernieserve.frontend.processor import InputProcessor, PromptType
from ernieserve.metrics.prometheus import RequestTiming, ServerMetrics
from ernieserve.outputs import RequestOutput
from ernieserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# After the process sentinel fires, how long to wait for the engine's own DEAD message (which
# says why) before failing requests with the bare exit code.
_DEATH_NOTICE_GRACE_S = 0.3


class EngineDeadError(RuntimeError):
    """The engine core process is gone; no request can be served."""


class EngineStartupError(RuntimeError):
    """The engine core process could not start; the message says why."""


class RequestRejected(ValueError):
    """The engine core refused the request (a guard the front end's checks should have caught)."""


@dataclass(slots=True)
class _Replica:
    """One engine core process (a data-parallel replica) and the front end's sockets to it."""

    index: int
    addresses: EngineAddresses
    inp: zmq.asyncio.Socket | None = None
    out: zmq.asyncio.Socket | None = None
    proc: multiprocessing.process.BaseProcess | None = None
    ready: EngineReady | None = None
    stats: SchedulerStats = field(default_factory=SchedulerStats)
    unfinished: set[str] = field(default_factory=set)  # engine request ids sent here, not finished
    handler: asyncio.Task | None = None


@dataclass(slots=True)
class _Stream:
    queue: asyncio.Queue
    timing: RequestTiming
    kind: OutputKind
    finished: bool = False


class AsyncLLM:
    def __init__(self, config: EngineConfig, *, addresses: EngineAddresses | None = None,
                 metrics: ServerMetrics | None = None, log_requests: bool = True) -> None:
        self.config = config
        self.processor = InputProcessor(config.model)
        self.tokenizer = self.processor.tokenizer
        self.output_processor = OutputProcessor(self.tokenizer)
        self.addresses = addresses or EngineAddresses.create()
        self.metrics = metrics
        self.log_requests = log_requests
        self.ready: EngineReady | None = None
        self.latest_stats = SchedulerStats()
        self.dead_reason: str | None = None
        self._streams: dict[str, _Stream] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._outputs_decoder = msgspec.msgpack.Decoder(EngineOutputs)
        self._error_decoder = msgspec.msgpack.Decoder(EngineError)
        self._dead_decoder = msgspec.msgpack.Decoder(EngineDead)
        self._ctx: zmq.asyncio.Context | None = None
        self._replicas = [_Replica(i, self.addresses.for_replica(i))
                          for i in range(config.parallel.data_parallel_size)]
        self._replica_of: dict[str, _Replica] = {}  # engine request id -> where it runs
        self._shutting_down = False

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self.ready is not None and self.dead_reason is None and not self._shutting_down

    @property
    def engine_pid(self) -> int | None:
        """Replica 0's engine core process (the only one without data parallelism)."""
        return self.engine_pids[0] if self.engine_pids else None

    @property
    def engine_pids(self) -> list[int]:
        return [r.proc.pid for r in self._replicas if r.proc is not None and r.proc.pid is not None]

    async def start(self) -> EngineReady:
        """Spawn the engine core(s) and wait until each has loaded the model and sized its KV cache."""
        self._bind_sockets()
        spawn = multiprocessing.get_context("spawn")
        for rep in self._replicas:
            config = self.config
            if len(self._replicas) > 1:  # each replica learns its index (its devices follow from it)
                config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel,
                                                                                  data_parallel_rank=rep.index))
            # Not daemonic: the core spawns tensor-parallel workers of its own, which daemonic
            # processes may not. It exits by itself if this process dies (it watches its parent).
            rep.proc = spawn.Process(target=run_engine_core, name=f"ernieserve-engine-core-{rep.index}",
                                     args=(config, rep.addresses, os.getpid(), logging.getLogger().level))
            rep.proc.start()
            logger.info("engine core process %sstarted (pid %d); loading the model",
                        f"of replica {rep.index} " if len(self._replicas) > 1 else "", rep.proc.pid)
        try:
            for rep in self._replicas:
                rep.ready = await self._wait_ready(rep)
        except BaseException:
            for rep in self._replicas:
                self._kill_process(rep)
            self._close_sockets()
            raise
        first = self._replicas[0].ready
        assert first is not None
        # the front end's view: the replicas' blocks together
        self.ready = msgspec.structs.replace(first, num_gpu_blocks=sum(r.ready.num_gpu_blocks  # type: ignore[union-attr]
                                                                       for r in self._replicas))
        if self.metrics is not None:
            self.metrics.set_engine_info(self.ready)
        loop = asyncio.get_running_loop()
        for rep in self._replicas:
            assert rep.proc is not None
            loop.add_reader(rep.proc.sentinel, self._on_process_exit, rep)
            rep.handler = asyncio.create_task(self._output_loop(rep), name=f"ernieserve-output-handler-{rep.index}")
        return self.ready

    def _bind_sockets(self) -> None:
        self._ctx = zmq.asyncio.Context()
        for rep in self._replicas:
            rep.inp = self._ctx.socket(zmq.PUSH)
            rep.inp.setsockopt(zmq.SNDHWM, 0)  # an abort must never wait behind a full queue
            rep.inp.setsockopt(zmq.LINGER, 0)
            rep.out = self._ctx.socket(zmq.PULL)
            rep.out.setsockopt(zmq.RCVHWM, 0)
            rep.out.setsockopt(zmq.LINGER, 0)
            for sock, addr in ((rep.inp, rep.addresses.input), (rep.out, rep.addresses.output)):
                try:
                    sock.bind(addr)
                except zmq.ZMQError as e:
                    self._close_sockets()
                    raise EngineStartupError(f"cannot bind the engine queue at {addr}: {e.strerror} (choose "
                                             "another --engine-worker-queue-port / --cache-queue-port)") from e

    async def _wait_ready(self, rep: _Replica) -> EngineReady:
        assert rep.out is not None and rep.proc is not None
        which = f" of replica {rep.index}" if len(self._replicas) > 1 else ""
        while True:
            if await rep.out.poll(200):
                tag, body = await rep.out.recv_multipart()
                if tag == OutputTag.READY.value:
                    return msgspec.msgpack.decode(body, type=EngineReady)
                if tag == OutputTag.DEAD.value:
                    rep.proc.join(10)
                    raise EngineStartupError(self._dead_decoder.decode(body).message)
                logger.warning("unexpected %r message before the engine was ready", tag)
            elif not rep.proc.is_alive():
                raise EngineStartupError(f"the engine core process{which} exited during startup "
                                         f"(exit code {rep.proc.exitcode}); see the log above")

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine core(s): ask them to stop, wait, then force them. Pending requests fail."""
        if self._shutting_down:
            return
        self._shutting_down = True
        loop = asyncio.get_running_loop()
        for rep in self._replicas:
            if rep.proc is not None and rep.proc.is_alive() and rep.inp is not None:
                rep.inp.send_multipart([InputTag.SHUTDOWN.value, b""])
        deadline = loop.time() + timeout_s
        while any(r.proc is not None and r.proc.is_alive() for r in self._replicas) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for rep in self._replicas:
            self._kill_process(rep)
            if rep.proc is not None:
                try:
                    loop.remove_reader(rep.proc.sentinel)
                except (ValueError, OSError):
                    pass
        self._fail_all("the engine was shut down")
        handlers = [r.handler for r in self._replicas if r.handler is not None]
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        self._close_sockets()

    @staticmethod
    def _kill_process(rep: _Replica) -> None:
        proc = rep.proc
        if proc is None or not proc.is_alive():
            return
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)

    def _close_sockets(self) -> None:
        for rep in self._replicas:
            for sock in (rep.inp, rep.out):
                if sock is not None:
                    sock.close(linger=0)
            rep.inp = rep.out = None
        if self._ctx is not None:
            self._ctx.term()
        self._ctx = None
        for rep in self._replicas:
            for path in rep.addresses.ipc_paths():
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    kind: OutputKind = OutputKind.DELTA, arrival_time: float | None = None) -> None:
        """Validate and queue a request. Raises ValueError (bad input) or EngineDeadError at once,
        so a server can answer 400/503 before it starts a stream."""
        self._check_alive()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, req = self.processor.process(request_id, prompt, params, arrival_time)
        child_ids = [child_request_id(request_id, i) for i in range(params.n)]
        timing = RequestTiming(req.arrival_time, len(req.prompt_token_ids), params.max_tokens, params.n)
        self._streams[request_id] = _Stream(asyncio.Queue(), timing, kind)
        self.output_processor.add_request(request_id, text, req.prompt_token_ids, params, kind, child_ids,
                                          req.arrival_time)
        # req.sampling_params, not params: the processor filled in bad_words_token_ids there
        processed = req.sampling_params
        # all samples on one replica (they share the prompt's cached blocks), the least loaded one
        target = min(self._replicas, key=lambda r: len(r.unfinished))
        for i, cid in enumerate(child_ids):
            child = processed.clone_for_child(i) if params.n > 1 else processed
            target.unfinished.add(cid)
            self._replica_of[cid] = target
            self._send(InputTag.ADD, msgspec.structs.replace(req, request_id=cid, sampling_params=child), target)
        if self.metrics is not None:
            self.metrics.on_request_received(timing)
        if self.log_requests:
            logger.info("request %s: %d prompt tokens, params %s", request_id, len(req.prompt_token_ids),
                        msgspec.json.encode(params).decode())

    async def stream_outputs(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The request's outputs until it finishes. Leaving early (cancelled, closed, error)
        aborts it in the engine, which frees its KV blocks at once."""
        stream = self._streams.get(request_id)
        if stream is None:
            raise KeyError(f"unknown request id {request_id!r}")
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(request_id)

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str,
                       kind: OutputKind = OutputKind.DELTA) -> AsyncIterator[RequestOutput]:
        self.add_request(request_id, prompt, params, kind)
        async for out in self.stream_outputs(request_id):
            yield out

    def abort(self, request_id: str) -> None:
        """Forget the request and abort its unfinished samples in the engine. Idempotent."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.finished = True
        child_ids = self.output_processor.abort_request(request_id)
        if child_ids and self._ctx is not None and self.dead_reason is None:
            self._send_aborts(child_ids)

    def _send_aborts(self, child_ids: list[str]) -> None:
        """Each abort to the replica that runs the request."""
        by_replica: dict[int, list[str]] = {}
        for cid in child_ids:
            rep = self._replica_of.get(cid)
            if rep is not None:
                by_replica.setdefault(rep.index, []).append(cid)
        for index, ids in by_replica.items():
            self._send(InputTag.ABORT, AbortRequests(ids), self._replicas[index])

    def _send(self, tag: InputTag, msg: msgspec.Struct, rep: _Replica) -> None:
        assert rep.inp is not None
        # No await: with an unlimited HWM the send completes now, so this is safe in `finally`
        # blocks of cancelled tasks.
        rep.inp.send_multipart([tag.value, self._encoder.encode(msg)], copy=False)

    def _forget(self, engine_request_id: str) -> None:
        """A request the engine finished (or refused): it no longer counts toward its replica's load."""
        rep = self._replica_of.pop(engine_request_id, None)
        if rep is not None:
            rep.unfinished.discard(engine_request_id)

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine is not running: {self.dead_reason}")
        if self.ready is None or self._shutting_down:
            raise EngineDeadError("the engine is not running")

    # ---- the output handler -------------------------------------------------------------------
    async def _output_loop(self, rep: _Replica) -> None:
        assert rep.out is not None
        which = f" of replica {rep.index}" if len(self._replicas) > 1 else ""
        try:
            while True:
                tag, body = await rep.out.recv_multipart()
                if tag == OutputTag.OUTPUTS.value:
                    self._on_outputs(self._outputs_decoder.decode(body), rep)
                elif tag == OutputTag.REQUEST_ERROR.value:
                    self._on_request_error(self._error_decoder.decode(body))
                elif tag == OutputTag.DEAD.value:
                    self._mark_dead(f"the engine core{which} failed: {self._dead_decoder.decode(body).message}")
                else:
                    logger.warning("unexpected %r message from the engine ignored", tag)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here would hang every request: fail them instead
            logger.exception("the output handler failed")
            self._mark_dead(f"the output handler failed: {type(e).__name__}: {e}")

    def _on_outputs(self, outs: EngineOutputs, rep: _Replica) -> None:
        now = time.time()
        if outs.scheduler_stats is not None:
            rep.stats = outs.scheduler_stats
            self.latest_stats = combine_stats([r.stats for r in self._replicas])
            if self.metrics is not None:
                self.metrics.on_scheduler_stats(self.latest_stats)
        self._note_first_scheduled(outs.first_scheduled)
        if self.metrics is not None:
            self.metrics.on_generation_tokens(sum(len(o.new_token_ids) for o in outs.outputs))
        for o in outs.outputs:
            if o.finish_reason is not None:
                self._forget(o.request_id)
        results, to_abort = self.output_processor.process_outputs(outs.outputs)
        if to_abort:
            self._send_aborts(to_abort)
        for ro in results:
            stream = self._streams.get(ro.request_id)
            if stream is not None:
                self._record_timing(stream, ro, now)
                stream.queue.put_nowait(ro)

    def _note_first_scheduled(self, first_scheduled: dict[str, float]) -> None:
        for cid, when in first_scheduled.items():
            parent = self.output_processor.child_to_parent.get(cid)
            stream = self._streams.get(parent) if parent is not None else None
            if stream is not None and stream.timing.first_scheduled_time is None:
                stream.timing.first_scheduled_time = when

    def _record_timing(self, stream: _Stream, ro: RequestOutput, now: float) -> None:
        timing = stream.timing
        total = sum(len(c.token_ids) for c in ro.outputs)
        # DELTA outputs carry only new tokens; the other kinds repeat what was counted before
        new_tokens = total if stream.kind == OutputKind.DELTA else total - timing.num_generation_tokens
        timing.num_generation_tokens += new_tokens
        if timing.first_token_time is None and new_tokens:
            timing.first_token_time = now
            if self.metrics is not None:
                self.metrics.on_first_token(timing)
        if ro.finished:
            stream.finished = True
            self._streams.pop(ro.request_id, None)
            timing.finish_time = now
            if self.metrics is not None:
                success = all(c.finish_reason != "abort" for c in ro.outputs)
                self.metrics.on_request_finished(timing, success)

    def _on_request_error(self, err: EngineError) -> None:
        self._forget(err.request_id)
        parent = self.output_processor.child_to_parent.get(err.request_id)
        if parent is None:
            return
        stream = self._streams.get(parent)
        self.abort(parent)  # the other samples of the request, if any
        if stream is not None:
            stream.queue.put_nowait(RequestRejected(err.message))

    def _on_process_exit(self, rep: _Replica) -> None:
        assert rep.proc is not None
        loop = asyncio.get_running_loop()
        loop.remove_reader(rep.proc.sentinel)
        if self._shutting_down:
            return
        rep.proc.join(1)
        code = rep.proc.exitcode
        which = f" of replica {rep.index}" if len(self._replicas) > 1 else ""
        loop.call_later(_DEATH_NOTICE_GRACE_S, self._mark_dead,
                        f"the engine core process{which} exited unexpectedly (exit code {code})")

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None or self._shutting_down:
            return
        self.dead_reason = reason
        logger.error("%s; failing %d pending request(s). The server stays up and reports 503 on /health.",
                     reason, len(self._streams))
        self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        for rid, stream in list(self._streams.items()):
            stream.finished = True
            stream.queue.put_nowait(EngineDeadError(reason))
            self.output_processor.abort_request(rid)
        self._streams.clear()
        self._replica_of.clear()
        for rep in self._replicas:
            rep.unfinished.clear()


def combine_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    """The replicas' scheduler stats as one engine's: counts and totals add up; the cache usage
    is that of all their blocks together."""
    if len(stats) == 1:
        return stats[0]
    summed = {f: sum(getattr(s, f) for s in stats) for f in SchedulerStats.__struct_fields__
              if f != "kv_cache_usage"}
    total = summed["num_total_blocks"]
    usage = (sum(s.kv_cache_usage * s.num_total_blocks for s in stats) / total) if total else 0.0
    return SchedulerStats(**summed, kv_cache_usage=usage)

