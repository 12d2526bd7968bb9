"""Tensor-parallel identity of this process and its collectives, passed explicitly to layers.

One process is one tensor-parallel rank, and its torch.distributed world is exactly its tensor-
parallel group: data-parallel replicas are separate engine core processes with worlds of their
own (engine/core_proc.py), so the default process group is the TP group and no module global is
needed. `SINGLE` (rank 0 of 1) makes every collective a no-op, which is what a one-device engine
and the layer unit tests use.

Collectives are in place where torch allows it and never synchronize with the host, so that they
can be captured in CUDA graphs (NCCL) and overlap with the next step's preparation. NCCL on GPUs,
gloo on CPU (`init_tp_group`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass
from typing import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    @property
    def is_first(self) -> bool:
        """Rank 0: the rank whose sampled tokens every rank uses."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns x."""
        if self.size == 1:
            return x
        dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank 0's columns first."""
        if self.size == 1:
            return x
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # [m, n]
        out = torch.empty(self.size * flat.shape[0], flat.shape[1], dtype=x.dtype, device=x.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, flat)
        # [size * m, n] -> [size, m, n] -> [m, size, n] -> [..., size * n]
        return out.view(self.size, *flat.shape).transpose(0, 1).reshape(*x.shape[:-1], self.size * x.shape[-1])

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x becomes rank 0's, in place; returns x."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest of each rank's `value` (a host sync: for startup, not for steps)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


SINGLE = TPGroup()

# Whether MoE layers built now split experts across ranks whole (--enable-expert-parallel) rather
# than slicing every expert. A construction scope like the quantization one (the loader sets it
# around model construction), so model classes need no extra argument; a context variable, so two
# engines built in two threads never see each other's.
_EXPERT_PARALLEL: contextvars.ContextVar[bool] = contextvars.ContextVar("ernieserve_ep", default=False)


@contextlib.contextmanager
def expert_parallel_scope(enabled: bool) -> Iterator[None]:
    token = _EXPERT_PARALLEL.set(enabled)
    try:
        yield
    finally:
        _EXPERT_PARALLEL.reset(token)


def scoped_expert_parallel() -> bool:
    return _EXPERT_PARALLEL.get()


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of the rank with this index on its host: cuda:{local_rank}; CPU ranks share the CPU."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def dist_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def create_store(master_addr: str, master_port: int, world_size: int, is_master: bool,
                 timeout_s: float) -> dist.TCPStore:
    """The rendezvous key-value store; rank 0's process hosts it (port 0 there: any free port,
    read back from `store.port`). Besides torch.distributed's own rendezvous it carries the
    addresses of rank 0's step channel (worker/executor.py), so workers need only this address."""
    return dist.TCPStore(master_addr, master_port, world_size, is_master=is_master,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def init_tp_group(store: dist.Store, rank: int, world_size: int, device: torch.device,
                  timeout_s: float) -> TPGroup:
    """Joins the process group (blocks until every rank has joined) and warms it up.

    The warm-up collective creates the NCCL communicator now, outside any CUDA graph capture
    (creating it inside one is not allowed).
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(dist_backend(device), store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    group = TPGroup(rank, world_size)
    warm = torch.ones(1, device=device)
    group.all_reduce(warm)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if int(warm.item()) != world_size:
        raise RuntimeError(f"tensor-parallel warm-up all-reduce gave {warm.item()}, expected {world_size}")
    return group


def destroy_tp_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a peer already gone: nothing left to tear down cleanly
            logger.debug("destroy_process_group: %s", e)


def abort_tp_group() -> None:
    """Best effort: make collectives blocked on a dead peer return (NCCL's communicator abort).
    Gloo needs none (a dead peer closes its sockets, and the collective raises)."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None or not dist.is_initialized():
        return
    try:
        abort()
    except Exception as e:
        logger.debug("abort of the process group failed: %s", e)
