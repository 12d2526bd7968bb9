"""CUDA graphs for decode-only steps.

A decode step at small batch is dozens of tiny kernels per layer; eagerly each launch costs ~34 µs
on an H100, replayed inside a graph ~1 µs. We capture the model forward, the LM head and the
sampling race (for batches that need no more than temperature and seeds) once per padded batch
size and replay it. Per-step inputs live in persistent buffers whose addresses the
graphs hold; a step copies its inputs in and pads the rest: a padded request has seq_len 0 and
slot -1, so it reads and writes nothing.
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
                 max_model_len: int, block_size: int, device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.sizes = sorted(capture_sizes)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        self.mrope = bool(getattr(model, "uses_mrope", False))  # 3-D rotary: positions [3, bs]
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
        # The sampling race runs inside the graph too (kernels/sampling.py): per-row temperature and
        # hash key in, sampled ids out; a batch that needs the full sampler ignores `sampled`.
        # "feed": which input ids (row 0) take which of the previous step's sampled ids (row 1).
        mb = self.max_bs
        self.inputs = PackedInputs({
            "input_ids": ((mb,), torch.int64), "positions": ((3, mb) if self.mrope else (mb,), torch.int64),
            "slot_mapping": ((mb,), torch.int64), "keys": ((mb,), torch.int64), "feed": ((2, mb), torch.int64),
            "seq_lens": ((mb,), torch.int32), "temperature": ((mb,), torch.float32)}, device)
        dev = self.inputs.device_views
        self.input_ids, self.positions, self.slot_mapping = dev["input_ids"], dev["positions"], dev["slot_mapping"]
        self.keys, self._feed, self.seq_lens, self.temperature = dev["keys"], dev["feed"], dev["seq_lens"], dev["temperature"]
        self.slot_mapping.fill_(-1)
        self.query_start_loc = torch.arange(self.max_bs + 1, **i32)  # one token per request, always
        self.block_tables = torch.zeros(self.max_bs, self.max_blocks, **i32)
        self.sampled = torch.zeros(self.max_bs, **i64)
        self._race = race_kernel()
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
        `self.sampled[:num_reqs]` (overwritten by the next replay: copy what must outlive it)."""
        n = len(step.req_ids)
        bs = self.sizes[int(self._bucket(self.sizes, n))]
        width = step.block_table.shape[1]
        # pad on the host so the step costs copies only, no fill kernels: a padded row's slot is -1
        # and its context length 0 (its other inputs keep earlier, valid values)
        host = self.inputs.next_host()
        host["input_ids"][:n] = step.input_ids
        host["positions"][..., :n] = step.mrope_positions if self.mrope else step.positions
        host["slot_mapping"][:n] = step.slot_mapping
        host["slot_mapping"][n:bs] = -1
        host["seq_lens"][:n] = step.seq_lens
        host["seq_lens"][n:bs] = 0
        num_fed = stage_sampling_and_feed(host, step, sampling, n)
        self.inputs.upload()
        self.block_tables[:n, :width].copy_(torch.from_numpy(step.block_table), non_blocking=True)
        feed_inflight(self.input_ids, self._feed, prev_sampled, num_fed)
        self.graphs[bs].replay()
        return self.logits[:n]


def stage_sampling_and_feed(host: dict[str, np.ndarray], step: StepInputs,
                            sampling: tuple[np.ndarray, np.ndarray] | None, rows: int) -> int:
    """Into a graph's host inputs: the race's per-row (temperature, key) of the first `rows`
    sampling rows, and the feed (which input ids take which of the previous step's sampled ids).
    Returns the number of fed ids."""
    if sampling is not None:
        host["temperature"][:rows] = sampling[0]
        host["keys"][:rows] = sampling[1]
    num_fed = len(step.inflight_pos)
    if num_fed:
        host["feed"][0, :num_fed] = step.inflight_pos
        host["feed"][1, :num_fed] = step.inflight_src
    return num_fed


def feed_inflight(input_ids: torch.Tensor, feed: torch.Tensor, prev_sampled: torch.Tensor | None,
                  num_fed: int) -> None:
    """On the device: the fed input ids from the previous step's sampled ids (feed uploaded)."""
    if num_fed:
        assert prev_sampled is not None
        input_ids.index_copy_(0, feed[0, :num_fed], prev_sampled.index_select(0, feed[1, :num_fed]))


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
    """A graph's per-step inputs as views of two device buffers, one of 64-bit and one of 32-bit
    words, so that a step fills them with two host-to-device copies instead of one per input. The
    host side rotates over three buffers of the same layout (pinned on CUDA): a step writes one
    that the device has finished copying from (steps overlap by one), through numpy views."""

    _WIDE = (torch.int64,)
    _COPIES = 3

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> None:
        self._fields = fields
        self._offsets: dict[str, int] = {}
        size = {True: 0, False: 0}
        for name, (shape, dtype) in fields.items():
            wide = dtype in self._WIDE
            self._offsets[name] = size[wide]
            size[wide] += math.prod(shape)
        self._dev64 = torch.zeros(size[True], dtype=torch.int64, device=device)
        self._dev32 = torch.zeros(size[False], dtype=torch.int32, device=device)
        self.device_views = self._views(self._dev64, self._dev32)
        pinned = device.type == "cuda"
        self._hosts = []
        for _ in range(self._COPIES):
            h64 = torch.zeros(size[True], dtype=torch.int64, pin_memory=pinned)
            h32 = torch.zeros(size[False], dtype=torch.int32, pin_memory=pinned)
            self._hosts.append((h64, h32, {k: v.numpy() for k, v in self._views(h64, h32).items()}))
        self._events: list[torch.cuda.Event | None] = [None] * self._COPIES
        self._next = 0

    def _views(self, buf64: torch.Tensor, buf32: torch.Tensor) -> dict[str, torch.Tensor]:
        views = {}
        for name, (shape, dtype) in self._fields.items():
            buf = buf64 if dtype in self._WIDE else buf32
            lo = self._offsets[name]
            view = buf[lo:lo + math.prod(shape)].view(shape)
            views[name] = view.view(dtype) if view.dtype != dtype else view  # float32 shares the 32-bit words
        return views

    def next_host(self) -> dict[str, np.ndarray]:
        """The next host buffer's numpy views, once the device has finished copying from it."""
        event = self._events[self._next]
        if event is not None:
            event.synchronize()
        return self._hosts[self._next][2]

    def upload(self) -> None:
        """Copy the buffer `next_host` returned to the device (two copies), then rotate."""
        h64, h32, _ = self._hosts[self._next]
        self._dev64.copy_(h64, non_blocking=True)
        self._dev32.copy_(h32, non_blocking=True)
        if self._dev64.is_cuda:
            event = torch.cuda.Event()
            event.record()
            self._events[self._next] = event
        self._next = (self._next + 1) % self._COPIES


def _ranges(sizes: list[int]) -> str:
    return f"{sizes}" if len(sizes) <= 8 else f"[{', '.join(map(str, sizes[:4]))}, ..., {sizes[-1]}] ({len(sizes)} sizes)"


def race_kernel():  # type: ignore[no-untyped-def]
    """kernels.sampling.gumbel_race, or None where Triton is off (the eager sampler then samples)."""
    from ernieserve.layers.sampler import sampling_kernels

    kernels = sampling_kernels()
    return kernels.gumbel_race if kernels is not None else None

