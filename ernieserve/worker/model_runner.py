"""Runs the model for one scheduled step: inputs in, sampled token ids out.

It sees block tables, never the block manager; it keeps its own copy of each request (built from
the scheduler's diffs) and appends the tokens it samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ernieserve.attention.base import AttentionBackend, AttentionMetadata
from ernieserve.config import EngineConfig
from ernieserve.core.scheduler import ModelRunnerOutput, SchedulerOutput
from ernieserve.distributed.parallel_state import SINGLE, TPGroup, rank_device
from ernieserve.engine.protocol import LogprobsLists
from ernieserve.engine.step_stats import StepTimes
from ernieserve.layers.sampler import LogprobsTensors, Sampler, compute_logprobs
from ernieserve.models.loader import build_model
from ernieserve.worker import kv_cache
from ernieserve.worker.cuda_graph import CudaGraphRunner, default_capture_sizes
from ernieserve.worker.mixed_graph import MixedGraphRunner
from ernieserve.worker.mm_inputs import EncoderCache, mrope_positions, splices_of_step
from ernieserve.worker.input_batch import (CachedRequestState, StepInputs, build_sampling_metadata,
                                           build_step_inputs, graph_sampling_inputs)
from ernieserve.worker.swap import KVSwapper, build_swapper

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _PendingStep:
    req_ids: list[str]  # requests that sample, in row order
    sampled: torch.Tensor | None  # [len(req_ids)] int64 on the device (after a graph step: a view of its buffer)
    logprobs: LogprobsTensors | None
    prompt_logprobs: dict[str, LogprobsLists]
    # each row's requested top logprobs, kept here: a request preempted or finished while its
    # token is in flight has no state any more when the token is read, but its logprob still counts
    num_logprobs: list[int | None] = field(default_factory=list)
    # CUDA: pinned host copies of `sampled` (and the logprobs), queued right behind the sampler, and
    # the event that marks them done; CPU: a copy of `sampled` (see _queue_host_copies)
    host: tuple[torch.Tensor, ...] | None = None
    copied: torch.cuda.Event | None = None
    # ERNIESERVE_STEP_STATS on CUDA: the step's kind and the events around its device work
    span: tuple[str, torch.cuda.Event, torch.cuda.Event] | None = None


def select_attention_backend(device: torch.device) -> AttentionBackend:
    if device.type == "cuda":
        try:
            from ernieserve.attention.triton_attn import TritonAttentionBackend

            return TritonAttentionBackend()
        except ImportError:
            logger.warning("Triton attention unavailable; using the pure-torch reference backend")
    from ernieserve.attention.torch_ref import TorchRefBackend

    return TorchRefBackend()


class ModelRunner:
    def __init__(self, config: EngineConfig, backend: AttentionBackend | None = None, tp: TPGroup = SINGLE,
                 local_rank: int = 0) -> None:
        """tp: this process's tensor-parallel rank. Every rank runs this same runner on the same
        scheduler outputs with its slice of the model; rank 0's sampled tokens are the ones used
        (worker/executor.py). local_rank: this rank's device index on its host."""
        self.config = config
        self.tp = tp
        self.device = rank_device(config.device.device, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # Triton launches and NCCL go to the current device
        self.block_size = config.cache.block_size
        self.vocab_size = config.model.vocab_size
        torch.manual_seed(config.model.seed)
        self.backend = backend or select_attention_backend(self.device)
        self.model = build_model(config.model, self.backend, self.device, tp, config.parallel.enable_expert_parallel)
        self.sampler = Sampler()
        self.states: dict[str, CachedRequestState] = {}
        # multimodal models: vision encoder outputs of live requests; 3-D rotary positions
        self.uses_mrope = bool(getattr(self.model, "uses_mrope", False))
        self.supports_multimodal = bool(getattr(self.model, "supports_multimodal", False))
        self.encoder_cache = EncoderCache()
        self.num_blocks = 0
        self.swapper: KVSwapper | None = None  # the prefix cache's host tier (--swap-space)
        self.graphs: CudaGraphRunner | None = None
        self.mixed_graphs: MixedGraphRunner | None = None  # opt-in: mixed steps from graphs too
        self._pending: _PendingStep | None = None  # the launched step whose tokens are not read yet
        self.step_times: StepTimes | None = None  # set by the engine per step when step stats are on

    @property
    def num_host_blocks(self) -> int:
        return self.swapper.num_host_blocks if self.swapper is not None else 0

    def release_graphs(self) -> None:
        """Drop the captured decode graphs (and their memory pool), after the device finished them."""
        if self.graphs is not None or self.mixed_graphs is not None:
            torch.cuda.synchronize(self.device)
            self.graphs = self.mixed_graphs = None

    def model_param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def decode_weight_bytes(self) -> int:
        """Weight bytes one batch-1 decode step reads on this device, the bandwidth floor's
        numerator: every parameter once, except that of the routed experts a token reads only the
        top_k it picks (shared experts folded in among them always; see MoEBlock)."""
        from ernieserve.layers.moe.layer import FusedMoE

        total = self.model_param_bytes()
        for m in self.model.modules():
            if not isinstance(m, FusedMoE):
                continue
            nbytes = sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
            shared = m.shared_slots
            routed = m.num_local_experts - shared  # stored here (all of them unless expert parallel)
            picked = min(routed, m.top_k * routed / m.num_experts)  # expected picks among them
            total -= nbytes - int(nbytes * (picked + shared) / (routed + shared))
        return total

    # ---- KV cache -----------------------------------------------------------------------------
    def initialize_kv_cache(self) -> int:
        cfg = self.config
        if cfg.cache.num_gpu_blocks_override is not None:
            num_blocks = cfg.cache.num_gpu_blocks_override
        elif self.device.type == "cuda":
            peak = self._profile_peak()
            pool = 0
            if self._mixed_graphs_wanted():  # their memory pool holds one more step's activations
                pool = max(0, peak - self.model_param_bytes())
            budget = kv_cache.gpu_kv_budget(cfg, self.device, peak + pool, graph_pool_bytes=pool)
            num_blocks = kv_cache.num_blocks_for_budget(cfg, budget)
        else:
            num_blocks = kv_cache.num_blocks_for_budget(cfg, kv_cache.cpu_kv_budget(cfg))
        num_blocks = self.tp.min_over_ranks(num_blocks, self.device)  # every rank holds the same blocks
        if num_blocks < 1:
            raise RuntimeError("no memory left for the KV cache after loading the model; lower "
                               "--max-num-batched-tokens or raise --gpu-memory-utilization")
        cache = kv_cache.allocate_kv_cache(cfg, num_blocks, self.device)
        self.model.bind_kv_caches(kv_cache.layer_views(cache))
        self.num_blocks = num_blocks
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB), %d tokens in all", num_blocks, self.block_size,
                    num_blocks * kv_cache.bytes_per_block(cfg) / 2**30, num_blocks * self.block_size)
        self.swapper = build_swapper(cfg, cache)
        self._maybe_capture_graphs()
        return num_blocks

    def _maybe_capture_graphs(self) -> None:
        dev = self.config.device
        if self.device.type == "cuda":
            from ernieserve.kernels import pdl

            logger.info("Programmatic dependent launch: %s", "on" if pdl.pdl_enabled(self.device) else
                        f"off ({pdl.ENV_VAR}=0, or not sm_90+ with a Triton that has launch_pdl)")
        if dev.enforce_eager or not self.backend.supports_cuda_graph():
            logger.info("CUDA graphs: off (%s)", "eager mode" if dev.enforce_eager else f"{self.backend.name} backend")
            return
        sizes = list(dev.cudagraph_capture_sizes or default_capture_sizes(self.config.scheduler.max_num_seqs))
        sched = self.config.scheduler
        self.graphs = CudaGraphRunner(self.model, self.backend, sizes, sched.max_model_len, self.block_size,
                                      self.device, sampled_rows=sched.max_num_seqs)
        self.graphs.capture()
        if self._mixed_graphs_wanted():  # sharing the decode graphs' sampled ids (their feed reads them)
            self.mixed_graphs = MixedGraphRunner(self.model, self.backend, sched.max_num_batched_tokens,
                                                 sched.max_num_seqs, sched.max_model_len, self.block_size, self.device,
                                                 sampled=self.graphs.sampled)
            self.mixed_graphs.capture()

    def _mixed_graphs_wanted(self) -> bool:
        """--graph-optimization-config cudagraph_mixed_steps, on a text model (multimodal steps
        splice encoder rows into the embeddings on the host's schedule)."""
        want = self.config.device.cudagraph_mixed_steps
        return (want is not False and not self.supports_multimodal
                and not self.config.device.enforce_eager and self.backend.supports_cuda_graph())

    @torch.inference_mode()
    def _profile_peak(self) -> int:
        """Peak device memory of the largest step (max_num_batched_tokens of prefill)."""
        torch.cuda.reset_peak_memory_stats(self.device)
        n = self.config.scheduler.max_num_batched_tokens
        blocks = -(-n // self.block_size)
        self.model.bind_kv_caches(kv_cache.allocate_kv_caches(self.config, blocks, self.device))
        states = {"profile": CachedRequestState("profile", [0] * n, [0] * n, _greedy(), list(range(blocks)), 0)}
        step = build_step_inputs(states, {"profile": n}, self.block_size)
        hidden = self.model(*self._device_inputs(step))
        self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.model.bind_kv_caches([(torch.empty(0), torch.empty(0))] * len(self.model.attention_layers()))
        torch.cuda.empty_cache()
        return peak

    # ---- state updates from the scheduler -----------------------------------------------------
    def _apply_diffs(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_req_ids:
            st = self.states.pop(rid, None)
            if st is not None and st.mm_items:
                self.encoder_cache.remove_request(rid, st.mm_items)
        for new in sched.new_reqs:
            # a request resumed after preemption comes back here as new (its state was dropped)
            p = new.sampling_params
            st = CachedRequestState(
                new.request_id, new.prompt_token_ids, new.prompt_token_ids + new.output_token_ids, p,
                list(new.block_ids), new.num_computed_tokens, new.eos_token_ids, mm_items=list(new.mm_items))
            if new.mm_items:
                if not self.supports_multimodal:
                    raise ValueError(f"request {new.request_id} has images or videos; this model takes text only")
                if self.uses_mrope:
                    st.mrope_positions, st.mrope_delta = self.model.get_mrope_positions(
                        new.prompt_token_ids, st.mm_items)
                self.encoder_cache.add_request(new.request_id, st.mm_items)
            self.states[new.request_id] = st
        for c in sched.cached_reqs:
            st = self.states[c.request_id]
            st.block_ids.extend(c.new_block_ids)
            st.num_computed_tokens = c.num_computed_tokens

    # ---- one step -----------------------------------------------------------------------------
    def _device_inputs(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        qsl_cpu = torch.from_numpy(step.query_start_loc)
        seq_cpu = torch.from_numpy(step.seq_lens)
        counts = np.diff(step.query_start_loc)
        decode_only = bool((counts == 1).all())
        # decode: the model's max length, as the CUDA graphs pass (the split-K policy's bound), so an
        # eager decode step splits the contexts as a replayed one does and gives the same bits
        max_seq_len = self.config.scheduler.max_model_len if decode_only else int(step.seq_lens.max())
        meta = AttentionMetadata(
            num_reqs=len(step.req_ids), num_tokens=int(step.query_start_loc[-1]), max_query_len=int(counts.max()),
            max_seq_len=max_seq_len, query_start_loc=qsl_cpu.to(dev, non_blocking=True),
            seq_lens=seq_cpu.to(dev, non_blocking=True),
            block_tables=torch.from_numpy(step.block_table).to(dev, non_blocking=True),
            slot_mapping=torch.from_numpy(step.slot_mapping).to(dev, non_blocking=True),
            query_start_loc_cpu=qsl_cpu, seq_lens_cpu=seq_cpu, is_decode_only=decode_only)
        input_ids = torch.from_numpy(step.input_ids).to(dev, non_blocking=True)
        pos = step.mrope_positions if step.mrope_positions is not None else step.positions
        positions = torch.from_numpy(pos).to(dev, non_blocking=True)  # [T], or [3, T] for 3-D rotary
        return input_ids, positions, meta

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Launches this step and returns the PREVIOUS step's results.

        Steps overlap: step t is prepared and launched while the device still runs step t-1, and
        step t-1's sampled ids are read (the one host sync) only afterwards. A decode input that is
        step t-1's token is filled in on the device from its sampled tensor. Only batches whose
        sampling reads generated ids by value (penalties, bad words, min_tokens) wait for them
        before launching.

        The step's KV block copies to and from the host tier are issued first, so that on CUDA
        they run while the previous step finishes (worker/swap.py says how they are ordered).
        """
        if sched.swap_out or sched.swap_in:
            assert self.swapper is not None, "block copies scheduled without a host tier"
            self.swapper.swap(sched.swap_out, sched.swap_in)
        prev, self._pending = self._pending, None
        self._apply_diffs(sched)
        out = None
        if prev is not None and (sched.is_empty or self._needs_token_values(sched)):
            out, prev = self._collect(prev), None
        if not sched.is_empty:
            self._pending = self._launch(sched, prev)
        if prev is not None:
            out = self._collect(prev)
        return out if out is not None else ModelRunnerOutput([], {})

    def _needs_token_values(self, sched: SchedulerOutput) -> bool:
        return any(self.states[rid].needs_token_values for rid in sched.num_scheduled_tokens)

    def _launch(self, sched: SchedulerOutput, prev: _PendingStep | None) -> _PendingStep:
        times, t0 = self.step_times, time.perf_counter()
        inflight = {rid: j for j, rid in enumerate(prev.req_ids)} if prev is not None else None
        step = build_step_inputs(self.states, sched.num_scheduled_tokens, self.block_size, inflight)
        if self.uses_mrope:
            step.mrope_positions = mrope_positions(self.states, step)
        prev_sampled = None  # input ids at step.inflight_pos <- its rows step.inflight_src
        if step.inflight_pos:
            assert prev is not None and prev.sampled is not None
            prev_sampled = prev.sampled
        pending = _PendingStep([], None, None, {})
        if self.swapper is not None:
            self.swapper.before_forward()  # the forward reads swapped-in blocks, overwrites swapped-out ones
        decode_only = sched.total_num_scheduled_tokens == len(step.req_ids)
        t1 = time.perf_counter()
        span_start = None
        if times is not None and self.device.type == "cuda":
            span_start = torch.cuda.Event(enable_timing=True)
            span_start.record()
        sample_states = [self.states[step.req_ids[i]] for i in step.sample_rows]
        sampled = None  # set when a graph sampled
        if self.graphs is not None and self.graphs.can_run(step, decode_only):
            kind = "decode-graph"
            logits, sampled = self._run_graph(step, prev_sampled)
        elif self.mixed_graphs is not None and self.mixed_graphs.can_run(step) and not self._wants_prompt_logprobs(step):
            kind = "mixed-graph"
            logits, sampled = self._run_mixed_graph(step, prev_sampled, sample_states)
        else:
            kind = "decode-eager" if decode_only else "mixed"
            logits = self._run_eager(step, pending.prompt_logprobs, prev_sampled)
        t2 = time.perf_counter()
        if logits is not None:
            logprobs = None
            if sampled is None:
                result = self.sampler(logits, build_sampling_metadata(sample_states, self.vocab_size, self.device))
                sampled, logprobs = result.sampled_token_ids, result.logprobs
            # rank 0's tokens for every rank: the next step's inputs must agree (random draws may not)
            self.tp.broadcast_from_first(sampled)
            pending.req_ids = [st.request_id for st in sample_states]
            pending.sampled = sampled  # stays on the device until read
            pending.logprobs = logprobs
            pending.num_logprobs = [st.sampling_params.logprobs for st in sample_states]
            for st in sample_states:
                st.num_inflight += 1  # the previous step's token may still be in flight too
            self._queue_host_copies(pending)
        if span_start is not None:
            span_end = torch.cuda.Event(enable_timing=True)
            span_end.record()
            pending.span = (kind, span_start, span_end)
        if self.swapper is not None:
            self.swapper.step_launched(step.block_table)
        if times is not None:
            times.kind, times.num_tokens, times.num_reqs = kind, sched.total_num_scheduled_tokens, len(step.req_ids)
            t3 = time.perf_counter()
            times.add("build", t1 - t0)
            times.add("forward", t2 - t1)
            times.add("sample", t3 - t2)
        return pending

    def _run_graph(self, step: StepInputs, prev_sampled: torch.Tensor | None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits of the rows that sample, their ids when the graph sampled them, else None)."""
        assert self.graphs is not None
        sampling = None
        if self.graphs.samples and step.sample_rows:
            sampling = graph_sampling_inputs([self.states[rid] for rid in step.req_ids])
        logits = self.graphs.run(step, prev_sampled, sampling)  # [num_reqs, vocab]
        n = len(step.req_ids)
        if not step.sample_rows:
            return None, None
        if len(step.sample_rows) < n:  # a one-token prompt chunk (a tiny token budget) samples nothing
            rows = torch.tensor(step.sample_rows, dtype=torch.int64).to(self.device, non_blocking=True)
            logits = logits.index_select(0, rows)
            sampled = self.graphs.sampled[:n].index_select(0, rows) if sampling is not None else None
        else:  # a view, no copy: see _queue_host_copies
            sampled = self.graphs.sampled[:n] if sampling is not None else None
        return logits, sampled

    def _run_mixed_graph(self, step: StepInputs, prev_sampled: torch.Tensor | None,
                         sample_states: list[CachedRequestState]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        assert self.mixed_graphs is not None
        sampling = graph_sampling_inputs(sample_states) if sample_states and self.mixed_graphs.samples else None
        logits = self.mixed_graphs.run(step, prev_sampled, sampling)  # [num sampling rows, vocab]
        if logits is None or sampling is None:
            return logits, None
        return logits, self.mixed_graphs.sampled[: len(sample_states)]  # a view, no copy: see _queue_host_copies

    def _wants_prompt_logprobs(self, step: StepInputs) -> bool:
        return any(self.states[rid].sampling_params.prompt_logprobs is not None for rid in step.req_ids)

    def _queue_host_copies(self, pending: _PendingStep) -> None:
        """Queue the sampled ids' (and logprobs') copies to pinned host memory now, right behind the
        sampler. Reading them later waits for this step's work only: a plain .tolist() at collect
        time would queue behind the NEXT step's kernels, already launched, and the host would wait
        for both steps, which serialises host and device work again.

        A graph step's `sampled` is a view of the graph runners' buffer, which the next replay
        overwrites (after its feed has read it). Everything that reads it is queued before that
        replay: this copy, the TP broadcast (in place, so that every rank's next feed reads rank
        0's ids) and the next step's feed (in its graph, or eagerly before it). On CPU, where
        `_collect` reads the tensor itself after the next step ran, it is copied here."""
        if pending.sampled is None:
            return
        if not pending.sampled.is_cuda:
            pending.host = (pending.sampled.clone(),)
            return
        lp = pending.logprobs
        tensors = (pending.sampled,) if lp is None else (pending.sampled, lp.token_ids, lp.logprobs, lp.ranks)
        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=True)
        pending.host = host
        pending.copied = torch.cuda.Event()
        pending.copied.record()

    def _collect(self, pending: _PendingStep) -> ModelRunnerOutput:
        """Wait for a launched step, hand its tokens to the request states, return its output."""
        if pending.sampled is None:
            return ModelRunnerOutput([], {}, prompt_logprobs=pending.prompt_logprobs)
        t0 = time.perf_counter()
        if pending.copied is not None:
            pending.copied.synchronize()  # the one host sync of the step
            sampled = pending.host[0].tolist()
            lp = (pending.host[1].tolist(), pending.host[2].tolist(), pending.host[3].tolist()) \
                if pending.logprobs is not None else None
        else:  # CPU: the copy taken at launch
            sampled = pending.host[0].tolist()
            lp = pending.logprobs.tolists() if pending.logprobs is not None else None
        if self.step_times is not None:
            self.step_times.add("wait", time.perf_counter() - t0)
            if pending.span is not None:
                kind, start, end = pending.span
                self.step_times.device_spans.append((kind, start.elapsed_time(end)))
        out = ModelRunnerOutput(pending.req_ids, {}, prompt_logprobs=pending.prompt_logprobs)
        for j, rid in enumerate(pending.req_ids):
            out.sampled_token_ids[rid] = [sampled[j]]
            k = pending.num_logprobs[j]
            if lp is not None and k is not None:
                out.logprobs[rid] = LogprobsLists([lp[0][j][: k + 1]], [lp[1][j][: k + 1]], [lp[2][j]])
            st = self.states.get(rid)
            if st is not None:
                st.token_ids.append(sampled[j])
                st.num_inflight -= 1
        return out

    def _run_eager(self, step: StepInputs, prompt_logprobs: dict[str, LogprobsLists],
                   prev_sampled: torch.Tensor | None = None) -> torch.Tensor | None:
        input_ids, positions, meta = self._device_inputs(step)
        if prev_sampled is not None:  # tokens the previous step sampled, never seen by the host
            idx = torch.tensor([step.inflight_pos, step.inflight_src], dtype=torch.int64)
            idx = idx.to(self.device, non_blocking=True)
            input_ids.index_copy_(0, idx[0], prev_sampled.index_select(0, idx[1]))
        splices = splices_of_step(self.states, step) if self.supports_multimodal else []
        if splices:  # this step computes (part of) image/video runs: their rows replace the placeholders
            self.encoder_cache.ensure(self.model, splices)
            embeds = self.model.embed_input_ids(input_ids)  # [num_tokens, hidden]
            self.encoder_cache.splice(embeds, splices)
            hidden = self.model(input_ids, positions, meta, inputs_embeds=embeds)
        else:
            hidden = self.model(input_ids, positions, meta)  # [num_tokens, hidden]
        self._prompt_logprobs(step, hidden, prompt_logprobs)
        if not step.sample_rows:
            return None
        last_token = torch.from_numpy(step.query_start_loc[1:][step.sample_rows] - 1).to(self.device, non_blocking=True)
        return self.model.compute_logits(hidden.index_select(0, last_token))  # [num_sampling, vocab]

    def _prompt_logprobs(self, step: StepInputs, hidden: torch.Tensor, out: dict[str, LogprobsLists]) -> None:
        """Logprobs of each prompt token given the ones before it, chunk by chunk."""
        for i, rid in enumerate(step.req_ids):
            st = self.states[rid]
            k = st.sampling_params.prompt_logprobs
            if k is None:
                continue
            lo, hi = int(step.query_start_loc[i]), int(step.query_start_loc[i + 1])
            first_pos = int(step.positions[lo])
            # position p predicts prompt token p + 1; only positions before the last prompt token
            n = min(hi - lo, len(st.prompt_token_ids) - 1 - first_pos)
            if n <= 0:
                continue
            logits = self.model.compute_logits(hidden[lo:lo + n])
            targets = torch.tensor(st.prompt_token_ids[first_pos + 1:first_pos + 1 + n], device=self.device)
            ids, lps, ranks = compute_logprobs(logits, targets, k).tolists()
            out[rid] = LogprobsLists(ids, lps, ranks)


def _greedy():  # type: ignore[no-untyped-def]
    from ernieserve.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0)
