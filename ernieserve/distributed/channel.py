"""The step channel between rank 0 and the tensor-parallel workers, and the heartbeats that turn a
dead rank into a clear error instead of a hang.

    rank 0 (engine core)                                  worker rank r (worker/worker_proc.py)
      step PUSH, one per worker ── EXECUTE | SHUTDOWN ──►  step PULL        (worker main thread)
      heartbeat PUB             ── beat every 0.5 s ─────►  heartbeat SUB    (worker health thread)
      control PULL              ◄── HELLO | READY | ERROR ─ control PUSH     (worker main thread)
                                ◄── beat every 0.5 s ────── control PUSH     (worker health thread)

EXECUTE carries the step's `SchedulerOutput` (a diff: new requests once, then block ids and
progress), pickled once and sent to every worker. Rank 0 binds everything and publishes the
addresses in the rendezvous store (distributed/parallel_state.py `create_store`), so a worker on
another node needs only the store's address. Rank 0 never unpickles what it receives: worker
messages are plain frames (tag, rank, UTF-8 text).

A PUSH socket queues messages until its peer connects, so nothing is lost to ZMQ's slow-joiner
effect; high-water marks are off (a step must never block on a slow worker: the collectives pace
the ranks). The network between nodes must be trusted, as torch.distributed's own store assumes.
"""

from __future__ import annotations

import enum
import pickle
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
import zmq

HEARTBEAT_INTERVAL_S = 0.5
# No beat for this long means the peer is gone (or hung beyond help). Generous: a loaded host can
# starve a thread for a while, and a false alarm takes the engine down.
HEARTBEAT_TIMEOUT_S = 30.0
_KEY = "ernieserve/channel"


class StepTag(bytes, enum.Enum):
    EXECUTE = b"exec"
    SHUTDOWN = b"stop"


class ControlTag(bytes, enum.Enum):
    HELLO = b"hello"  # connected; about to join the process group
    READY = b"ready"  # model loaded and KV cache sized; body: "param_bytes num_blocks"
    BEAT = b"beat"
    ERROR = b"error"  # body: what went wrong; the worker exits after sending it


@dataclass(frozen=True, slots=True)
class ChannelAddresses:
    steps: dict[int, str]  # worker rank -> address of its step socket
    control: str  # workers -> rank 0
    heartbeat: str  # rank 0 -> workers

    def publish(self, store: dist.Store) -> None:
        for rank, addr in self.steps.items():
            store.set(f"{_KEY}/step/{rank}", addr)
        store.set(f"{_KEY}/control", self.control)
        store.set(f"{_KEY}/heartbeat", self.heartbeat)

    @staticmethod
    def lookup(store: dist.Store, rank: int) -> tuple[str, str, str]:
        """(step, control, heartbeat) addresses for one worker; blocks until rank 0 published them."""
        get = lambda key: store.get(f"{_KEY}/{key}").decode()  # noqa: E731
        return get(f"step/{rank}"), get("control"), get("heartbeat")


class Rank0Channel:
    """Rank 0's sockets. The step sockets belong to the thread that runs steps; the control and
    heartbeat sockets to the monitor thread (ZMQ sockets are not thread-safe, the context is)."""

    def __init__(self, ctx: zmq.Context, worker_ranks: list[int], bind_host: str, advertise_host: str) -> None:
        self.steps: dict[int, zmq.Socket] = {}
        step_addrs = {}
        for rank in worker_ranks:
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.LINGER, 1000)
            step_addrs[rank] = _bind(sock, bind_host, advertise_host)
            self.steps[rank] = sock
        self.control = ctx.socket(zmq.PULL)
        self.control.setsockopt(zmq.RCVHWM, 0)
        self.control.setsockopt(zmq.LINGER, 0)
        self.heartbeat = ctx.socket(zmq.PUB)
        self.heartbeat.setsockopt(zmq.LINGER, 0)
        self.addresses = ChannelAddresses(step_addrs, _bind(self.control, bind_host, advertise_host),
                                          _bind(self.heartbeat, bind_host, advertise_host))

    def send_step(self, tag: StepTag, payload: Any = None, timeout_ms: int = 1000) -> list[int]:
        """Send to every worker; returns the ranks not reachable within the timeout. A PUSH socket
        blocks while its peer is not connected (a worker that died disconnects): never wait on it
        unbounded."""
        body = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL) if payload is not None else b""
        unreachable = []
        for rank, sock in self.steps.items():
            if sock.poll(timeout_ms, zmq.POLLOUT):
                sock.send_multipart([tag.value, body], flags=zmq.NOBLOCK, copy=False)
            else:
                unreachable.append(rank)
        return unreachable

    def beat(self) -> None:
        self.heartbeat.send(ControlTag.BEAT.value)

    def recv_control(self, timeout_ms: int) -> tuple[ControlTag, int, str] | None:
        if not self.control.poll(timeout_ms):
            return None
        tag, rank, body = self.control.recv_multipart()
        return ControlTag(tag), int(rank), body.decode(errors="replace")

    def close(self) -> None:
        for sock in [*self.steps.values(), self.control, self.heartbeat]:
            sock.close()


class WorkerChannel:
    """A worker's sockets: step and control for its main thread; the health thread makes its own
    pair with `health_sockets`."""

    def __init__(self, ctx: zmq.Context, rank: int, addresses: tuple[str, str, str]) -> None:
        self.rank = rank
        self.ctx = ctx
        step_addr, self.control_addr, self.heartbeat_addr = addresses
        self.step = ctx.socket(zmq.PULL)
        self.step.setsockopt(zmq.RCVHWM, 0)
        self.step.setsockopt(zmq.LINGER, 0)
        self.step.connect(step_addr)
        self.control = _control_push(ctx, self.control_addr)

    def recv_step(self, timeout_ms: int) -> tuple[StepTag, Any] | None:
        if not self.step.poll(timeout_ms):
            return None
        tag, body = self.step.recv_multipart()
        return StepTag(tag), (pickle.loads(body) if body else None)

    def send(self, tag: ControlTag, text: str = "") -> None:
        send_control(self.control, tag, self.rank, text)

    def send_final(self, tag: ControlTag, text: str = "") -> None:
        """A last message before the process exits: through a context of its own, whose term()
        returns once the message is out (or after the linger), which os._exit would not wait for."""
        ctx = zmq.Context()
        sock = _control_push(ctx, self.control_addr)
        send_control(sock, tag, self.rank, text)
        sock.close()
        ctx.term()

    def health_sockets(self) -> tuple[zmq.Socket, zmq.Socket]:
        """(heartbeat SUB, control PUSH) for the health thread."""
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.heartbeat_addr)
        return sub, _control_push(self.ctx, self.control_addr)

    def close(self) -> None:
        self.step.close()
        self.control.close()


def send_control(sock: zmq.Socket, tag: ControlTag, rank: int, text: str = "") -> None:
    sock.send_multipart([tag.value, str(rank).encode(), text.encode()])


def _control_push(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 2000)  # an ERROR sent just before exiting must still arrive
    sock.connect(address)
    return sock


def _bind(sock: zmq.Socket, bind_host: str, advertise_host: str) -> str:
    port = sock.bind_to_random_port(f"tcp://{bind_host}")
    return f"tcp://{advertise_host}:{port}"


class Deadline:
    """Seconds since the last sign of life of a peer."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self.last
