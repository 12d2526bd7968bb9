"""CUDA graphs for mixed steps: prefill chunks and decodes together (on by default for text models).

Run eagerly, a mixed step is a few hundred launches at ~34 µs each on an H100, 8-9 ms for
ERNIE-4.5-0.3B whatever the token count. These graphs capture the whole step (model, the LM head
over the sampling rows, the sampling race) per padded token count, with the request count padded
to `max_num_seqs`. That works because the Triton unified attention kernel takes its grid from the
token and request counts only (host ints, fixed per graph) and finds each tile's request on the
device; a padded request owns no tokens (its query range is empty, its context 0) and padded
tokens have slot -1 and belong to no request (their attention output is zero).

Token buckets: 16, 32, 64, 128, 256, then every 256 up to max_num_batched_tokens, so padding
wastes at most 256 tokens of compute. Steps that need every token's hidden state (prompt logprobs)
or multimodal embeddings stay eager. Dense and MoE text models alike (their GPU token-equality
tests: tests/gpu/test_engine_gpu.py); `--graph-optimization-config '{"cudagraph_mixed_steps": false}'`
turns them off. Measured on an H100 (docs/performance.md, 2026-11-22 14:54): the 0.3B offline
workload ran at 48,944 output tok/s with them, 19,637 without.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ernieserve.attention.base import AttentionBackend, AttentionMetadata
from ernieserve.worker.cuda_graph import (PackedInputs, capture_graphs, feed_inputs, feed_kernel, race_kernel,
                                          stage_sampling_and_feed)
from ernieserve.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


def mixed_token_sizes(max_tokens: int) -> list[int]:
    sizes = [s for s in (16, 32, 64, 128, 256) if s < max_tokens]
    sizes += list(range(256, max_tokens, 256))[1:] if max_tokens > 256 else []
    return sorted(set(sizes + [max_tokens]))


class MixedGraphRunner:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, max_tokens: int, max_reqs: int,
                 max_model_len: int, block_size: int, device: torch.device,
                 sampled: torch.Tensor | None = None) -> None:
        """sampled: the decode graphs' `sampled` buffer, to share (at least max_reqs rows): the
        graphs of either kind then find the previous step's ids where the other's race left them,
        and a step that follows one of the other kind needs no copy before its replay."""
        self.model = model
        self.backend = backend
        self.sizes = mixed_token_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.max_reqs = max_reqs
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        t, r = self.max_tokens, max_reqs
        # sample_index: the token row of each sampling request, in sampling order; feed: which input
        # ids (row 0) take which of the previous step's sampled ids (row 1; -1: none), in the graph
        self.inputs = PackedInputs({
            "input_ids": ((t,), torch.int64), "positions": ((t,), torch.int64), "slot_mapping": ((t,), torch.int64),
            "sample_index": ((r,), torch.int64), "keys": ((r,), torch.int64), "feed": ((2, r), torch.int32),
            "query_start_loc": ((r + 1,), torch.int32), "seq_lens": ((r,), torch.int32),
            "temperature": ((r,), torch.float32)}, device, table=(r, self.max_blocks))
        dev = self.inputs.device_views
        self.input_ids, self.positions, self.slot_mapping = dev["input_ids"], dev["positions"], dev["slot_mapping"]
        self.sample_index, self.keys, self._feed = dev["sample_index"], dev["keys"], dev["feed"]
        self.query_start_loc, self.seq_lens, self.temperature = dev["query_start_loc"], dev["seq_lens"], dev["temperature"]
        self.block_tables = dev[PackedInputs.TABLE]
        self.slot_mapping.fill_(-1)
        self._feed[1].fill_(-1)
        if sampled is None or sampled.numel() < r:
            sampled = torch.zeros(r, dtype=torch.int64, device=device)
        self.sampled = sampled
        self.logits: torch.Tensor | None = None  # [max_reqs, vocab], shared by every graph
        self._race = race_kernel()
        self._feed_ids = feed_kernel()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _meta(self, tokens: int) -> AttentionMetadata:
        r = self.max_reqs
        return AttentionMetadata(
            num_reqs=r, num_tokens=tokens, max_query_len=tokens, max_seq_len=self.max_model_len,
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, block_tables=self.block_tables,
            slot_mapping=self.slot_mapping[:tokens],
            query_start_loc_cpu=torch.zeros(r + 1, dtype=torch.int32), seq_lens_cpu=torch.zeros(r, dtype=torch.int32),
            is_decode_only=False, zero_unowned_rows=True)

    def _forward(self, tokens: int) -> None:
        self._feed_ids(self.input_ids, self._feed, self.sampled)
        hidden = self.model(self.input_ids[:tokens], self.positions[:tokens], self._meta(tokens))
        logits = self.model.compute_logits(hidden.index_select(0, self.sample_index))  # [max_reqs, vocab]
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)
        if self._race is not None:
            self._race(self.logits, self.keys, self.temperature, out=self.sampled[: self.max_reqs])

    def capture(self) -> None:
        start = time.perf_counter()
        self.graphs = capture_graphs(self.sizes, self._forward, self.device, "Capturing mixed-step graphs")
        logger.info("Captured %d CUDA graphs for mixed steps of %s tokens (requests padded to %d) in %.1f s",
                    len(self.sizes), self.sizes, self.max_reqs, time.perf_counter() - start)

    @property
    def samples(self) -> bool:
        return self._race is not None

    def can_run(self, step: StepInputs) -> bool:
        return (int(step.query_start_loc[-1]) <= self.max_tokens and len(step.req_ids) <= self.max_reqs
                and step.block_table.shape[1] <= self.max_blocks)

    def run(self, step: StepInputs, prev_sampled: torch.Tensor | None,
            sampling: tuple[np.ndarray, np.ndarray] | None) -> torch.Tensor | None:
        """Logits [num sampling rows, vocab] (None when no row samples); with `sampling` (per sampling row: temperature, key)
        the graph also samples them into `self.sampled[:num sampling rows]` (the next replay of
        either kind reads it, its feed, then overwrites it)."""
        n_tok, n_req, n_smp = int(step.query_start_loc[-1]), len(step.req_ids), len(step.sample_rows)
        tokens = self.sizes[int(np.searchsorted(self.sizes, n_tok))]
        # padded tokens: slot -1, no request; padded requests: empty query range, no context
        host = self.inputs.next_host()
        host["input_ids"][:n_tok] = step.input_ids
        host["positions"][:n_tok] = step.positions
        host["slot_mapping"][:n_tok] = step.slot_mapping
        host["slot_mapping"][n_tok:tokens] = -1
        host["query_start_loc"][: n_req + 1] = step.query_start_loc
        host["query_start_loc"][n_req + 1:] = n_tok
        host["seq_lens"][:n_req] = step.seq_lens
        host["seq_lens"][n_req:] = 0
        host["sample_index"][:n_smp] = step.query_start_loc[1:][step.sample_rows] - 1
        host["sample_index"][n_smp:] = 0
        num_fed = stage_sampling_and_feed(host, step, sampling, n_smp)
        self.inputs.upload(step.block_table)
        feed_inputs(self.sampled, prev_sampled, num_fed)
        self.graphs[tokens].replay()
        assert self.logits is not None
        return self.logits[:n_smp] if n_smp else None
