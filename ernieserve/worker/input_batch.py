"""The worker's copy of each running request, kept in step with the scheduler by diffs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from ernieserve.layers.sampler import row_keys
from ernieserve.layers.sampling_metadata import SamplingMetadata
from ernieserve.multimodal.inputs import MultiModalItem
from ernieserve.sampling_params import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, position) pairs over the generator's seed space


@dataclass(slots=True)
class CachedRequestState:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # prompt + output, grows as the worker samples
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: list[int] = field(default_factory=list)
    # sampled tokens of launched steps whose ids are still on the device only (0, 1 or, between
    # launching step t and reading step t-1, 2)
    num_inflight: int = 0
    mm_items: list[MultiModalItem] = field(default_factory=list)  # images/videos of the prompt
    # 3-D rotary models: [3, num_prompt_tokens] prompt positions; generated index p -> p + delta
    mrope_positions: np.ndarray | None = None
    mrope_delta: int = 0

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, counting one still in flight (its id is on the device only)."""
        return len(self.token_ids) - len(self.prompt_token_ids) + self.num_inflight

    @property
    def output_token_ids(self) -> list[int]:
        """The generated ids the host knows (not one still in flight)."""
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def needs_token_values(self) -> bool:
        """Sampling that reads the generated ids themselves, not just their count."""
        p = self.sampling_params
        return bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                    or p.bad_words_token_ids or p.min_tokens)


@dataclass(slots=True)
class StepInputs:
    """Host-side arrays of one step, in batch order."""

    req_ids: list[str]
    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    query_start_loc: np.ndarray  # [num_reqs + 1] int32
    seq_lens: np.ndarray  # [num_reqs] int32
    block_table: np.ndarray  # [num_reqs, max_blocks] int32
    sample_rows: list[int]  # indices (into req_ids) of requests that sample this step
    # token positions (into input_ids) whose id is the previous step's sampled token, still on the
    # device, and that token's row in the previous step's sampled tensor
    inflight_pos: list[int] = field(default_factory=list)
    inflight_src: list[int] = field(default_factory=list)
    mrope_positions: np.ndarray | None = None  # [3, num_tokens] for 3-D rotary models


def build_step_inputs(states: dict[str, CachedRequestState], num_scheduled: dict[str, int],
                      block_size: int, inflight_rows: dict[str, int] | None = None) -> StepInputs:
    """inflight_rows: request id -> its row in the previous step's sampled tensor, for requests
    whose last token is still on the device (filled in there, after the host copy)."""
    req_ids = list(num_scheduled)
    counts = np.fromiter(num_scheduled.values(), dtype=np.int64, count=len(req_ids))
    qsl = np.zeros(len(req_ids) + 1, dtype=np.int32)
    np.cumsum(counts, out=qsl[1:])
    if int(qsl[-1]) == len(req_ids):
        return _build_decode_step(states, req_ids, qsl, block_size, inflight_rows)
    return _build_any_step(states, req_ids, counts, qsl, block_size, inflight_rows)


def _build_any_step(states: dict[str, CachedRequestState], req_ids: list[str], counts: np.ndarray,
                    qsl: np.ndarray, block_size: int, inflight_rows: dict[str, int] | None) -> StepInputs:
    """Any mix of prefill chunks and decodes: one loop iteration per request, vectorised within."""
    num_tokens = int(qsl[-1])
    input_ids = np.empty(num_tokens, dtype=np.int64)
    positions = np.empty(num_tokens, dtype=np.int64)
    seq_lens = np.empty(len(req_ids), dtype=np.int32)
    max_blocks = max(len(states[r].block_ids) for r in req_ids)
    block_table = np.zeros((len(req_ids), max_blocks), dtype=np.int32)
    sample_rows: list[int] = []
    inflight_pos: list[int] = []
    inflight_src: list[int] = []
    for i, rid in enumerate(req_ids):
        st = states[rid]
        start, end = st.num_computed_tokens, st.num_computed_tokens + int(counts[i])
        known = st.token_ids[start:end]
        if len(known) < end - start:  # the last input token is the one in flight
            assert st.num_inflight and inflight_rows is not None and len(known) == end - start - 1
            inflight_pos.append(int(qsl[i + 1]) - 1)
            inflight_src.append(inflight_rows[rid])
            known = known + [0]
        input_ids[qsl[i]:qsl[i + 1]] = known
        positions[qsl[i]:qsl[i + 1]] = np.arange(start, end)
        seq_lens[i] = end
        block_table[i, : len(st.block_ids)] = st.block_ids
        if end == len(st.token_ids) + st.num_inflight:
            sample_rows.append(i)
    req_of_token = np.repeat(np.arange(len(req_ids)), counts)
    slot_mapping = block_table[req_of_token, positions // block_size].astype(np.int64) * block_size \
        + positions % block_size
    return StepInputs(req_ids, input_ids, positions, slot_mapping, qsl, seq_lens, block_table, sample_rows,
                      inflight_pos, inflight_src)


def _build_decode_step(states: dict[str, CachedRequestState], req_ids: list[str], qsl: np.ndarray,
                       block_size: int, inflight_rows: dict[str, int] | None) -> StepInputs:
    """`build_step_inputs` for a decode-only step (one new token per request), vectorised across
    requests: the per-request Python work is reading a few attributes, not filling arrays."""
    n = len(req_ids)
    sts = [states[r] for r in req_ids]
    positions = np.fromiter((st.num_computed_tokens for st in sts), dtype=np.int64, count=n)
    known = np.fromiter((len(st.token_ids) for st in sts), dtype=np.int64, count=n)
    pending = np.fromiter((st.num_inflight for st in sts), dtype=np.int64, count=n)
    # a request's input is its token at `position`, or the previous step's, still on the device
    input_ids = np.fromiter((st.token_ids[p] if p < k else 0 for st, p, k in zip(sts, positions.tolist(), known.tolist())),
                            dtype=np.int64, count=n)
    in_flight = np.flatnonzero(positions >= known)
    inflight_pos = in_flight.tolist()
    if inflight_pos:
        assert inflight_rows is not None and bool((positions[in_flight] == known[in_flight]).all())
    inflight_src = [inflight_rows[req_ids[i]] for i in inflight_pos] if inflight_pos else []
    num_blocks = np.fromiter((len(st.block_ids) for st in sts), dtype=np.int64, count=n)
    block_table = np.zeros((n, int(num_blocks.max())), dtype=np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(st.block_ids for st in sts), dtype=np.int32,
                       count=int(num_blocks.sum()))
    row_of = np.repeat(np.arange(n), num_blocks)
    col_of = np.arange(flat.size) - np.repeat(np.cumsum(num_blocks) - num_blocks, num_blocks)
    block_table[row_of, col_of] = flat
    seq_lens = (positions + 1).astype(np.int32)
    sample_rows = np.flatnonzero(positions + 1 == known + pending).tolist()
    slot_mapping = block_table[np.arange(n), positions // block_size].astype(np.int64) * block_size \
        + positions % block_size
    return StepInputs(req_ids, input_ids, positions, slot_mapping, qsl, seq_lens, block_table, sample_rows,
                      inflight_pos, inflight_src)


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out).to(device, non_blocking=True)


def build_sampling_metadata(states: list[CachedRequestState], vocab_size: int,
                            device: torch.device) -> SamplingMetadata:
    """Per-step sampling tensors for the requests that sample, in batch order."""
    params = [s.sampling_params for s in states]
    temps = [0.0 if p.greedy else p.temperature for p in params]
    greedy = [t == 0.0 for t in temps]
    f32 = dict(dtype=torch.float32, device=device)
    meta = SamplingMetadata(temperature=torch.tensor(temps, **f32), all_greedy=all(greedy),
                            all_random=not any(greedy))
    if any(p.top_p < 1.0 for p in params):
        meta.top_p = torch.tensor([p.top_p for p in params], **f32)
    if any(p.top_k > 0 for p in params):
        meta.top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)
    if any(p.min_p > 0.0 for p in params):
        meta.min_p = torch.tensor([p.min_p for p in params], **f32)
    if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
        meta.repetition_penalties = torch.tensor([p.repetition_penalty for p in params], **f32)
        meta.presence_penalties = torch.tensor([p.presence_penalty for p in params], **f32)
        meta.frequency_penalties = torch.tensor([p.frequency_penalty for p in params], **f32)
        meta.prompt_token_ids = _padded([s.prompt_token_ids for s in states], vocab_size, device)
        meta.output_token_ids = _padded([s.output_token_ids for s in states], vocab_size, device)
    for row, (s, p) in enumerate(zip(states, params)):
        if p.seed is not None and not greedy[row]:
            meta.seeds[row] = _seed_key(s)
        if p.min_tokens and s.num_output_tokens < p.min_tokens:
            meta.min_tokens[row] = (p.min_tokens, sorted(set(s.eos_token_ids) | set(p.stop_token_ids or ())))
        if p.bad_words_token_ids:
            meta.bad_words_token_ids[row] = p.bad_words_token_ids
    if meta.min_tokens or meta.bad_words_token_ids:  # host-side rules read the outputs so far
        meta.output_token_lists = [s.output_token_ids for s in states]
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    meta.max_num_logprobs = max(wanted) if wanted else None
    return meta


def _seed_key(state: CachedRequestState) -> int:
    """A seeded request's hash key for its next token: from (seed, output position), so that the
    draw depends on nothing else: the same tokens alone, in any batch, and after preemption."""
    return (state.sampling_params.seed * _SEED_MIX + state.num_output_tokens) % (2**64)


def graph_sampling_inputs(states: list[CachedRequestState]) -> tuple[np.ndarray, np.ndarray] | None:
    """(temperature float32 [n], hash keys int64 [n]) for a batch that the race alone can sample,
    inside the decode step's CUDA graph (worker/cuda_graph.py): every row greedy or random with a
    temperature and maybe a seed. None when any row needs the full sampler (top_k, top_p, min_p,
    penalties, bad words, min_tokens, logprobs). The same draws as `Sampler` with the same keys."""
    temps = np.empty(len(states), dtype=np.float32)
    seeds: dict[int, int] = {}
    for row, st in enumerate(states):
        p = st.sampling_params
        if (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 or p.logprobs is not None or st.needs_token_values):
            return None
        temps[row] = 0.0 if p.greedy else p.temperature
        if p.seed is not None and not p.greedy:
            seeds[row] = _seed_key(st)
    return temps, row_keys(seeds, len(states)).numpy()

