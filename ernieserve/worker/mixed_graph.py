"""CUDA graphs for mixed steps: prefill chunks and decodes together (on by default for dense models).

Run eagerly, a mixed step is a few hundred launches at ~34 µs each on an H100, 8-9 ms for
ERNIE-4.5-0.3B whatever the token count. These graphs capture the whole step (model, the LM head
over the sampling rows, the sampling race) per padded token count, with the request count padded
to `max_num_seqs`. That works because the Triton unified attention kernel takes its grid from the
token and request counts only (host ints, fixed per graph) and finds each tile's request on the
device; a padded request owns no tokens (its query range is empty, its context 0) and padded
tokens have slot -1 and belong to no request (their attention output is zero).

Token buckets: 16, 32, 64, 128, 256, then every 256 up to max_num_batched_tokens, so padding
wastes at most 256 tokens of compute. Steps that need every token's hidden state (prompt logprobs)
or multimodal embeddings stay eager. MoE models run mixed steps eagerly unless
`--graph-optimization-config '{"cudagraph_mixed_steps": true}'`: their GPU equality test has not
finished yet (tests/gpu/test_engine_gpu.py). `'{"cudagraph_mixed_steps": false}'` turns them off. Measured on an H100 (docs/performance.md, 2026-11-22 14:54): the 0.3B offline
workload ran at 48,944 output tok/s with them, 19,637 without.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ernieserve.attention.base import AttentionBackend, AttentionMetadata
from ernieserve.worker.cuda_graph import capture_graphs, race_kernel
from ernieserve.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


def mixed_token_sizes(max_tokens: int) -> list[int]:
    sizes = [s for s in (16, 32, 64, 128, 256) if s < max_tokens]
    sizes += list(range(256, max_tokens, 256))[1:] if max_tokens > 256 else []
    return sorted(set(sizes + [max_tokens]))


class MixedGraphRunner:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, max_tokens: int, max_reqs: int,
                 max_model_len: int, block_size: int, device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.sizes = mixed_token_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.max_reqs = max_reqs
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
        t, r = self.max_tokens, max_reqs
        self.input_ids = torch.zeros(t, **i64)
        self.positions = torch.zeros(t, **i64)
        self.slot_mapping = torch.full((t,), -1, **i64)
        self.query_start_loc = torch.zeros(r + 1, **i32)
        self.seq_lens = torch.zeros(r, **i32)
        self.block_tables = torch.zeros(r, self.max_blocks, **i32)
        self.sample_index = torch.zeros(r, **i64)  # the token row of each sampling request, in sampling order
        self.temperature = torch.zeros(r, dtype=torch.float32, device=device)
        self.keys = torch.zeros(r, **i64)
        self.sampled = torch.zeros(r, **i64)
        self.logits: torch.Tensor | None = None  # [max_reqs, vocab], shared by every graph
        self._race = race_kernel()
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
        hidden = self.model(self.input_ids[:tokens], self.positions[:tokens], self._meta(tokens))
        logits = self.model.compute_logits(hidden.index_select(0, self.sample_index))  # [max_reqs, vocab]
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)
        if self._race is not None:
            self._race(self.logits, self.keys, self.temperature, out=self.sampled)

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
        the graph also samples them into `self.sampled[:num sampling rows]` (the next replay
        overwrites it)."""
        n_tok, n_req, n_smp = int(step.query_start_loc[-1]), len(step.req_ids), len(step.sample_rows)
        tokens = self.sizes[int(np.searchsorted(self.sizes, n_tok))]
        # padded tokens: slot -1, no request; padded requests: empty query range, no context
        slots = np.full(tokens, -1, dtype=np.int64)
        slots[:n_tok] = step.slot_mapping
        qsl = np.full(self.max_reqs + 1, n_tok, dtype=np.int32)
        qsl[: n_req + 1] = step.query_start_loc
        seq_lens = np.zeros(self.max_reqs, dtype=np.int32)
        seq_lens[:n_req] = step.seq_lens
        rows = np.zeros(self.max_reqs, dtype=np.int64)
        rows[:n_smp] = step.query_start_loc[1:][step.sample_rows] - 1
        self.input_ids[:n_tok].copy_(torch.from_numpy(step.input_ids), non_blocking=True)
        self.positions[:n_tok].copy_(torch.from_numpy(step.positions), non_blocking=True)
        self.slot_mapping[:tokens].copy_(torch.from_numpy(slots), non_blocking=True)
        self.query_start_loc.copy_(torch.from_numpy(qsl), non_blocking=True)
        self.seq_lens.copy_(torch.from_numpy(seq_lens), non_blocking=True)
        self.block_tables[:n_req, : step.block_table.shape[1]].copy_(torch.from_numpy(step.block_table),
                                                                     non_blocking=True)
        self.sample_index.copy_(torch.from_numpy(rows), non_blocking=True)
        if sampling is not None:
            self.temperature[:n_smp].copy_(torch.from_numpy(sampling[0]), non_blocking=True)
            self.keys[:n_smp].copy_(torch.from_numpy(sampling[1]), non_blocking=True)
        if step.inflight_pos:
            assert prev_sampled is not None
            idx = torch.tensor([step.inflight_pos, step.inflight_src], dtype=torch.int64).to(self.device, non_blocking=True)
            self.input_ids.index_copy_(0, idx[0], prev_sampled.index_select(0, idx[1]))
        self.graphs[tokens].replay()
        assert self.logits is not None
        return self.logits[:n_smp] if n_smp else None
