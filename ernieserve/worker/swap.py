"""Copies KV blocks between the device cache and the host tier of the prefix cache (--swap-space).

The scheduler decides the copies (core/kv_cache_manager.py); this performs them before the step's
forward pass: every swap-out (device -> host: evicted cached blocks), then every swap-in (host ->
device: prefix hits found on the host). Swap-outs go first because a block evicted in a step can
be the destination of a swap-in of the same step.

Per round of up to `staging` blocks (layouts in worker/kv_cache.py):
  swap-out: one gather kernel, every layer at once, into a device staging buffer; then one DMA per
            run of consecutive host block ids (a host block is contiguous).
  swap-in:  one DMA per run into the staging buffer; then one scatter kernel into the cache.

On CUDA the copies run on a stream of their own, so they overlap the step in flight:

  compute: | step t-1 |e(t-1)                        wait(copied) | step t |
  swap:        wait(e(t-2), or e(t-1)) | swap-outs | swap-ins | copied

Steps overlap (the engine schedules and launches step t while t-1 runs), so before copying, the
swap stream waits for the device work that may still touch these blocks:
  - The scheduler evicts or reuses a block only at ref_count 0, so no request of step t holds it.
    But step t-1, launched before the block was freed, may still write it (e.g. the token of a
    request that stopped or was preempted after t-1 was launched) or read it. So when a block
    copied appears in the block table of the latest launched step, the copies wait for that
    step's end event; otherwise for the end of the step before it (which may still be running:
    the host never syncs on a step that samples nothing).
  - The step's forward pass (compute stream) waits on the copies' event before it starts: it
    overwrites evicted blocks and reads swapped-in ones. CUDA graph replays read the same block
    tables, so the same wait covers them.
  - Across steps the swap stream runs in order (a host block read by a swap-in at step t may be
    rewritten by a swap-out at t+1); within a step the scheduler pins host blocks that swap-ins
    read, so no swap-out of that step targets them.
On CPU every copy is synchronous, in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ernieserve.config import EngineConfig
from ernieserve.core.kv_cache_manager import BlockCopies
from ernieserve.worker import kv_cache

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Launched:
    done: torch.cuda.Event  # recorded on the compute stream after the step's last kernel
    block_table: np.ndarray  # [num_reqs, max_blocks] int32: every block the step reads or writes


def block_runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in ids, first id, length) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            runs.append((start, ids[start], i - start))
            start = i
    return runs


class KVSwapper:
    def __init__(self, device_cache: torch.Tensor, host_cache: torch.Tensor, staging_blocks: int) -> None:
        self.cache = device_cache  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.host = host_cache  # [num_host_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        self.device = device_cache.device
        # [staging_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], block-major like the host
        self.stage = torch.empty((staging_blocks, *host_cache.shape[1:]), dtype=host_cache.dtype, device=self.device)
        # the same buffer with blocks on dim 2, like the cache: [num_layers, 2, staging_blocks, ...]
        self.stage_by_layer = self.stage.permute(1, 2, 0, 3, 4, 5)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._latest: _Launched | None = None
        self._before_latest: torch.cuda.Event | None = None
        self._copied: torch.cuda.Event | None = None  # copies the next forward pass must wait for

    @property
    def num_host_blocks(self) -> int:
        return self.host.shape[0]

    @property
    def staging_blocks(self) -> int:
        return self.stage.shape[0]

    # ---- ordering against the compute stream -------------------------------------------------
    def step_launched(self, block_table: np.ndarray) -> None:
        """Called after a step's kernels are queued: remember its end and the blocks it touches."""
        if self.stream is None:
            return
        done = torch.cuda.Event()
        done.record()
        self._before_latest = self._latest.done if self._latest is not None else None
        self._latest = _Launched(done, block_table)

    def before_forward(self) -> None:
        """Make the compute stream wait for the copies issued so far (call before the forward)."""
        if self._copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied)
            self._copied = None

    def _wait_for_device_work(self, swap_out: BlockCopies, swap_in: BlockCopies) -> None:
        assert self.stream is not None
        latest = self._latest
        if latest is None:  # nothing launched yet: the cache's zero fill may still be queued
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            return
        blocks = np.array([d for d, _ in swap_out] + [d for _, d in swap_in], dtype=np.int64)
        # block 0 pads the table's short rows: a spurious conflict there only costs overlap
        if self._before_latest is None or np.isin(blocks, latest.block_table).any():
            self.stream.wait_event(latest.done)
        else:
            self.stream.wait_event(self._before_latest)

    # ---- the copies ---------------------------------------------------------------------------
    def swap(self, swap_out: BlockCopies, swap_in: BlockCopies) -> None:
        """Issue one step's copies: (device, host) swap-outs, then (host, device) swap-ins."""
        if not swap_out and not swap_in:
            return
        if self.stream is None:
            self._copy(swap_out, swap_in)
            return
        self._wait_for_device_work(swap_out, swap_in)
        with torch.cuda.stream(self.stream):
            self._copy(swap_out, swap_in)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self._copied = copied

    def _copy(self, swap_out: BlockCopies, swap_in: BlockCopies) -> None:
        # in host-block order, for long runs (a freed request's blocks are evicted tail first);
        # stable, so two swap-outs into one host block in a step keep their order
        swap_out = sorted(swap_out, key=lambda p: p[1])
        swap_in = sorted(swap_in, key=lambda p: p[0])
        step = self.staging_blocks
        for i in range(0, len(swap_out), step):
            self._copy_out(swap_out[i:i + step])
        for i in range(0, len(swap_in), step):
            self._copy_in(swap_in[i:i + step])

    def _copy_out(self, pairs: BlockCopies) -> None:
        n = len(pairs)
        src = self._index([d for d, _ in pairs])
        # [num_layers, 2, n, block_size, num_kv_heads, head_dim] gathered into the block-major stage
        torch.index_select(self.cache, 2, src, out=self.stage_by_layer[:, :, :n])
        for i, h, length in block_runs([h for _, h in pairs]):
            self.host[h:h + length].copy_(self.stage[i:i + length], non_blocking=True)

    def _copy_in(self, pairs: BlockCopies) -> None:
        n = len(pairs)
        for i, h, length in block_runs([h for h, _ in pairs]):
            self.stage[i:i + length].copy_(self.host[h:h + length], non_blocking=True)
        dst = self._index([d for _, d in pairs])
        self.cache.index_copy_(2, dst, self.stage_by_layer[:, :, :n])

    def _index(self, ids: list[int]) -> torch.Tensor:
        """[len(ids)] int64 block ids on the device, copied on the current (swap) stream."""
        t = torch.tensor(ids, dtype=torch.int64)
        if self.stream is None:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)


def build_swapper(config: EngineConfig, device_cache: torch.Tensor) -> KVSwapper | None:
    """The host tier and its swapper, or None without --swap-space (or without prefix caching)."""
    num_host = kv_cache.num_host_blocks(config)
    if num_host == 0:
        if config.cache.swap_space_gb > 0 and not config.cache.enable_prefix_caching:
            logger.warning("--swap-space %.2f GiB is ignored: the host tier keeps prefix-cache blocks, and "
                           "prefix caching is off", config.cache.swap_space_gb)
        elif config.cache.swap_space_gb > 0:
            logger.warning("--swap-space %.4f GiB holds no whole KV block (%d bytes); no host tier",
                           config.cache.swap_space_gb, kv_cache.bytes_per_block(config))
        return None
    pin = device_cache.device.type == "cuda"
    host = kv_cache.allocate_host_cache(config, num_host, pin)
    swapper = KVSwapper(device_cache, host, kv_cache.swap_staging_blocks(config, num_host))
    bs = config.cache.block_size
    logger.info("Prefix cache host tier (--swap-space): %d blocks of %d tokens (%.2f GiB%s), %d tokens in all",
                num_host, bs, num_host * kv_cache.bytes_per_block(config) / 2**30, ", pinned" if pin else "",
                num_host * bs)
    return swapper
