"""CUDA graphs for decode-only steps.

A decode step at small batch is dozens of tiny kernels per layer; eagerly each launch costs ~34 µs
on an H100, replayed inside a graph ~1 µs. We capture the model forward, the LM head and the
sampling race (for batches that need no more than temperature and seeds) once per padded batch
size and replay it. Per-step inputs live in persistent buffers whose addresses the
graphs hold; a step copies its inputs in and pads the rest: a padded request has seq_len 0 and
slot -1, so it reads and writes nothing.

Between two replays of a steady decode the device runs two copies: the previous step's sampled
ids to the host, and this step's inputs (block table included, when small) in one upload
(`PackedInputs`). The input ids still in flight (the previous step's, not yet read by the host)
are resolved by the graph's first kernel from the `sampled` buffer the previous replay's race
wrote (`feed_inputs`, kernels/step_feed.py); the step keeps a view of that buffer, not a copy.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ernieserve.attention.base import AttentionBackend, AttentionMetadata
from ernieserve.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, capture_sizes: list[int],
                 max_model_len: int, block_size: int, device: torch.device, sampled_rows: int = 0) -> None:
        """sampled_rows: at least this many rows in the `sampled` buffer (the engine's
        max_num_seqs: a step samples at most that many, and the feed reads any previous step's ids
        from it); the mixed-step graphs share it (see `feed_inputs`)."""
        self.model = model
        self.backend = backend
        self.sizes = sorted(capture_sizes)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        self.mrope = bool(getattr(model, "uses_mrope", False))  # 3-D rotary: positions [3, bs]
        # The sampling race runs inside the graph too (kernels/sampling.py): per-row temperature and
        # hash key in, sampled ids out; a batch that needs the full sampler ignores `sampled`.
        # "feed": which input ids (row 0) take which of the previous step's sampled ids (row 1; -1:
        # none), resolved inside the graph (kernels/step_feed.py). The block table rides in the
        # same upload when it is small (PackedInputs).
        mb = self.max_bs
        self.inputs = PackedInputs({
            "input_ids": ((mb,), torch.int64), "positions": ((3, mb) if self.mrope else (mb,), torch.int64),
            "slot_mapping": ((mb,), torch.int64), "keys": ((mb,), torch.int64), "feed": ((2, mb), torch.int32),
            "seq_lens": ((mb,), torch.int32), "temperature": ((mb,), torch.float32)}, device,
            table=(mb, self.max_blocks))
        dev = self.inputs.device_views
        self.input_ids, self.positions, self.slot_mapping = dev["input_ids"], dev["positions"], dev["slot_mapping"]
        self.keys, self._feed, self.seq_lens, self.temperature = dev["keys"], dev["feed"], dev["seq_lens"], dev["temperature"]
        self.block_tables = dev[PackedInputs.TABLE]
        self.slot_mapping.fill_(-1)
        self._feed[1].fill_(-1)
        self.query_start_loc = torch.arange(self.max_bs + 1, dtype=torch.int32, device=device)  # one token a request
        self.sampled = torch.zeros(max(mb, sampled_rows), dtype=torch.int64, device=device)
        self._race = race_kernel()
        self._feed_ids = feed_kernel()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # one output buffer shared by every graph: a logits tensor per batch size would pin
        # sum(sizes) * vocab values (about 0.9 GB for ERNIE's 103k vocabulary at 256 sequences)
        self.logits: torch.Tensor | None = None
        self._bucket = np.searchsorted  # smallest capture size >= n

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_reqs=bs, num_tokens=bs, max_query_len=1, max_seq_len=self.max_model_len,
            query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
            query_start_loc_cpu=torch.arange(bs + 1, dtype=torch.int32), seq_lens_cpu=torch.zeros(bs, dtype=torch.int32),
            is_decode_only=True)

    def _forward(self, bs: int) -> None:
        # the whole input-id buffer: feed positions are < bs, and unused pairs are never followed
        self._feed_ids(self.input_ids, self._feed[:, :bs], self.sampled)
        hidden = self.model(self.input_ids[:bs], self.positions[..., :bs], self._meta(bs))
        logits = self.model.compute_logits(hidden)  # [bs, vocab]
        if self.logits is None:
            self.logits = torch.empty(self.max_bs, logits.shape[-1], dtype=logits.dtype, device=self.device)
        self.logits[:bs].copy_(logits)
        if self._race is not None:
            self._race(self.logits[:bs], self.keys[:bs], self.temperature[:bs], out=self.sampled[:bs])

    def capture(self) -> None:
        start = time.perf_counter()
        self.backend.init_cuda_graph_state(self.max_bs, self.max_blocks, self.device)
        self.graphs = capture_graphs(self.sizes, self._forward, self.device, "Capturing CUDA graphs")
        logger.info("Captured %d CUDA graphs for decode batch sizes %s in %.1f s", len(self.sizes),
                    _ranges(self.sizes), time.perf_counter() - start)

    def can_run(self, step: StepInputs, is_decode_only: bool) -> bool:
        return is_decode_only and len(step.req_ids) <= self.max_bs and step.block_table.shape[1] <= self.max_blocks

    @property
    def samples(self) -> bool:
        """Whether the graphs also sample (the race kernel is there: Triton on CUDA)."""
        return self._race is not None

    def run(self, step: StepInputs, prev_sampled: torch.Tensor | None = None,
            sampling: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
        """Logits [num_reqs, vocab] of a decode step (every request has one new token).
        prev_sampled: the previous step's sampled ids on the device; input ids at
        step.inflight_pos take its rows step.inflight_src (the host has only placeholders there).
        sampling: per-row (temperature, hash key); the graph then samples each row into
        `self.sampled[:num_reqs]`, which the next replay reads (its feed) and then overwrites:
        whatever reads it later than that needs a copy."""
        n = len(step.req_ids)
        bs = self.sizes[int(self._bucket(self.sizes, n))]
        # pad on the host so the step costs copies only, no fill kernels: a padded row's slot is -1
        # and its context length 0 (its other inputs keep earlier, valid values)
        host = self.inputs.next_host()
        host["input_ids"][:n] = step.input_ids
        host["positions"][..., :n] = step.mrope_positions if self.mrope else step.positions
        host["slot_mapping"][:n] = step.slot_mapping
        host["slot_mapping"][n:bs] = -1
        host["seq_lens"][:n] = step.seq_lens
        host["seq_lens"][n:bs] = 0
        stage_sampling_and_feed(host, step, sampling, n)
        self.inputs.upload(step.block_table)
        feed_inputs(self.sampled, prev_sampled, len(step.inflight_pos))
        self.graphs[bs].replay()
        return self.logits[:n]


def stage_sampling_and_feed(host: dict[str, np.ndarray], step: StepInputs,
                            sampling: tuple[np.ndarray, np.ndarray] | None, rows: int) -> int:
    """Into a graph's host inputs: the race's per-row (temperature, key) of the first `rows`
    sampling rows, and the feed (which input ids take which of the previous step's sampled ids;
    every other pair: source -1, position 0). Returns the number of fed ids."""
    if sampling is not None:
        host["temperature"][:rows] = sampling[0]
        host["keys"][:rows] = sampling[1]
    feed = host["feed"]
    num_fed = len(step.inflight_pos)
    feed[0, :num_fed] = step.inflight_pos
    feed[1, :num_fed] = step.inflight_src
    feed[0, num_fed:] = 0
    feed[1, num_fed:] = -1
    return num_fed


def feed_inputs(sampled: torch.Tensor, prev_sampled: torch.Tensor | None, num_fed: int) -> bool:
    """Before a replay whose graph feeds input ids from `sampled` (the graph runners' buffer):
    make the previous step's ids readable there. Nothing to do when `prev_sampled` is that buffer
    (the usual case: the previous step's graph sampled into it and the step kept a view); else one
    device copy (the previous step ran eagerly, or the full sampler sampled, or only some of its
    rows sampled). Returns whether it copied."""
    if not num_fed:
        return False
    assert prev_sampled is not None and prev_sampled.dim() == 1
    if prev_sampled.data_ptr() == sampled.data_ptr():  # a view of its first rows
        return False
    assert prev_sampled.numel() <= sampled.numel(), (prev_sampled.numel(), sampled.numel())
    sampled[: prev_sampled.numel()].copy_(prev_sampled)
    return True


def feed_prev_ids_torch(ids: torch.Tensor, feed: torch.Tensor, prev: torch.Tensor) -> None:
    """kernels/step_feed.py's feed in capturable torch ops (where Triton is off): ids[feed[0, j]]
    = prev[feed[1, j]] where feed[1, j] >= 0. Unused pairs' positions must be in range (the
    staging writes 0)."""
    src = torch.full_like(ids, -1)
    src.scatter_reduce_(0, feed[0].long(), feed[1].long(), reduce="amax")  # an unused pair's -1 changes nothing
    ids.copy_(torch.where(src >= 0, prev[src.clamp(min=0)], ids))


def feed_kernel() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """The in-graph feed: kernels/step_feed.py's one launch, or its torch ops where Triton is off."""
    from ernieserve.layers.norm import load_elementwise_kernel, triton_elementwise_enabled

    module = load_elementwise_kernel("step_feed") if triton_elementwise_enabled() else None
    return module.feed_prev_ids if module is not None else feed_prev_ids_torch


@torch.inference_mode()
def capture_graphs(sizes: list[int], forward: Callable[[int], None], device: torch.device,
                   desc: str) -> dict[int, torch.cuda.CUDAGraph]:
    """One graph of forward(size) per size, largest first, all in one memory pool (they never run
    at once, so the smaller ones reuse the largest one's memory)."""
    from ernieserve.kernels import split_k

    split_k.tile_counters(device)  # the split-K counters exist before any capture records their address
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    for size in tqdm(sorted(sizes, reverse=True), desc=desc, unit="graph"):
        for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
            forward(size)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            forward(size)
        graphs[size] = graph
    torch.cuda.synchronize(device)
    return graphs


class PackedInputs:
    """A graph's per-step inputs as views of ONE device buffer of 32-bit words, filled by one
    host-to-device copy a step. 64-bit fields are int64 views of word pairs, float32 fields views
    of words; every field starts 16 bytes aligned (as its own allocation would), in the order given.

    `table` (rows, cols): a block table [rows, cols] int32 after the fields, device view
    "block_tables". A step's table rows ride in the same copy when the host buffers have room for
    them (`table_cap_bytes` of table words; a row is `cols` words, so short max_model_len fits
    many rows, long ones few or none); the copy then covers the fields and the table's used
    prefix only, `(n - 1) * cols + width` words of it. A larger table takes a second copy, straight
    into the same device view (whose address the graphs hold either way).

    The host side rotates over three buffers of the same layout (pinned on CUDA): a step writes
    one that the device has finished copying from (steps overlap by one), through numpy views."""

    TABLE = "block_tables"
    TABLE_CAP_BYTES = 64 * 1024
    _ALIGN = 4  # words: 16 bytes
    _COPIES = 3

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device,
                 table: tuple[int, int] | None = None, table_cap_bytes: int | None = None) -> None:
        assert self.TABLE not in fields
        self._fields = dict(fields)
        self._offsets: dict[str, int] = {}
        words = 0
        for name, (shape, dtype) in self._fields.items():
            assert dtype.itemsize in (4, 8), f"{name}: 32- or 64-bit fields only"
            words = _round_up(words, self._ALIGN)
            self._offsets[name] = words
            words += math.prod(shape) * dtype.itemsize // 4
        self.table_rows, self.table_cols = table if table is not None else (0, 0)
        self.table_offset = _round_up(words, self._ALIGN) if table is not None else words
        self.head_words = self.table_offset  # always copied: the fields (and alignment padding)
        total = self.table_offset + self.table_rows * self.table_cols
        cap_words = (self.TABLE_CAP_BYTES if table_cap_bytes is None else table_cap_bytes) // 4
        # table rows a host buffer carries: a step with more takes the second copy
        self.host_table_rows = min(self.table_rows, cap_words // self.table_cols) if self.table_cols else 0
        host_words = self.table_offset + self.host_table_rows * self.table_cols
        self._dev = torch.zeros(total, dtype=torch.int32, device=device)
        self.device_views = self._views(self._dev, self.table_rows)
        pinned = device.type == "cuda"
        self._hosts = []
        for _ in range(self._COPIES):
            buf = torch.zeros(host_words, dtype=torch.int32, pin_memory=pinned)
            self._hosts.append((buf, {k: v.numpy() for k, v in self._views(buf, self.host_table_rows).items()}))
        self._events: list[torch.cuda.Event | None] = [None] * self._COPIES
        self._next = 0

    def _views(self, buf: torch.Tensor, table_rows: int) -> dict[str, torch.Tensor]:
        views = {}
        for name, (shape, dtype) in self._fields.items():
            lo = self._offsets[name]
            words = buf[lo:lo + math.prod(shape) * dtype.itemsize // 4]
            views[name] = (words if dtype == torch.int32 else words.view(dtype)).view(shape)
        if self.table_cols:
            lo = self.table_offset
            views[self.TABLE] = buf[lo:lo + table_rows * self.table_cols].view(table_rows, self.table_cols)
        return views

    def next_host(self) -> dict[str, np.ndarray]:
        """The next host buffer's numpy views, once the device has finished copying from it. Its
        "block_tables" view has `host_table_rows` rows: `upload` fills it."""
        event = self._events[self._next]
        if event is not None:
            event.synchronize()
        return self._hosts[self._next][1]

    def upload(self, table: np.ndarray | None = None) -> int:
        """Copy the buffer `next_host` returned to the device, with `table` ([n, width] int32, the
        step's block table) in the table's first rows and columns, then rotate. One copy when the
        table fits the host buffer (or there is none), else two. Returns the words of the first
        copy. Table entries past a row's width, and rows past n, keep older values: attention
        never reads past a request's context length, and a padded request has none."""
        buf, host = self._hosts[self._next]
        words, late = self.head_words, None
        if table is not None:
            n, width = table.shape
            assert n <= self.table_rows and width <= self.table_cols, (table.shape, self.table_rows, self.table_cols)
            if n <= self.host_table_rows:
                host[self.TABLE][:n, :width] = table
                words += (n - 1) * self.table_cols + width if n else 0
            else:
                late = table
        self._dev[:words].copy_(buf[:words], non_blocking=True)
        if late is not None:  # pageable: the copy waits for its staging, the host buffer is not read
            self.device_views[self.TABLE][: late.shape[0], : late.shape[1]].copy_(torch.from_numpy(late),
                                                                                  non_blocking=True)
        if self._dev.is_cuda:
            event = torch.cuda.Event()
            event.record()
            self._events[self._next] = event
        self._next = (self._next + 1) % self._COPIES
        return words


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _ranges(sizes: list[int]) -> str:
    return f"{sizes}" if len(sizes) <= 8 else f"[{', '.join(map(str, sizes[:4]))}, ..., {sizes[-1]}] ({len(sizes)} sizes)"


def race_kernel():  # type: ignore[no-untyped-def]
    """kernels.sampling.gumbel_race, or None where Triton is off (the eager sampler then samples)."""
    from ernieserve.layers.sampler import sampling_kernels

    kernels = sampling_kernels()
    return kernels.gumbel_race if kernels is not None else None

