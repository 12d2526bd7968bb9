"""Decode steps that sample inside the CUDA graph give the eager engine's tokens.

No GPU here: the graph runner's buffers, padding, in-graph race and the model runner's use of them
run as they would, but each "replay" runs the captured function eagerly (FakeGraph). The
attention backend is the Triton one (interpreted on CPU), which reads the graph's device-side
metadata as the GPU does; the race runs through the interpreted kernel. Greedy and seeded rows
must equal the eager engine's, batches that need the full sampler (top_k, logprobs) fall back to
it on the graph's logits, and a one-token prompt chunk in a decode-only step samples nothing.
"""

from __future__ import annotations

import os

import pytest

if "TRITON_INTERPRET" not in os.environ:
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)", allow_module_level=True)
pytest.importorskip("triton")

from ernieserve import LLM, SamplingParams  # noqa: E402
from ernieserve.worker import model_runner  # noqa: E402
from ernieserve.worker.cuda_graph import CudaGraphRunner  # noqa: E402
from ernieserve.worker.mixed_graph import MixedGraphRunner  # noqa: E402

pytestmark = pytest.mark.slow  # the interpreted attention kernels take seconds per step


class FakeGraph:
    def __init__(self, owner: CudaGraphRunner, bs: int) -> None:
        self.owner, self.bs = owner, bs

    def replay(self) -> None:
        self.owner.replays += 1
        self.owner._forward(self.bs)


class FakeGraphRunner(CudaGraphRunner):
    def capture(self) -> None:
        self.replays = 0
        self.backend.init_cuda_graph_state(self.max_bs, self.max_blocks, self.device)
        self.graphs = {bs: FakeGraph(self, bs) for bs in self.sizes}


def _engine(model, monkeypatch, graphs: bool, budget: int, blocks: int = 64) -> LLM:
    from ernieserve.attention.triton_attn import TritonAttentionBackend

    monkeypatch.setattr(model_runner, "select_attention_backend", lambda device: TritonAttentionBackend())
    llm = LLM(model=str(model), enforce_eager=True, max_model_len=128, max_num_seqs=8, block_size=16,
              num_gpu_blocks_override=blocks, max_num_batched_tokens=budget, seed=0)
    if graphs:
        runner = llm.llm_engine.core.runner
        runner.graphs = FakeGraphRunner(runner.model, runner.backend, [1, 2, 4, 8], 128, 16, runner.device,
                                        sampled_rows=8)
        runner.graphs.capture()
        assert runner.graphs.samples, "the race kernel must be there (Triton)"
    return llm


PROMPTS = [[5 + i, 17, 29 + 3 * i, 41, 7 * i + 3] + list(range(60, 60 + 3 * i)) for i in range(6)]


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=11, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.3, seed=12, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=13, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=14, max_tokens=10, ignore_eos=True),
    ]


def _run(llm: LLM, params: list[SamplingParams]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _count_feeds(monkeypatch) -> list[tuple[int, bool]]:
    """(ids fed, whether they were copied into the graphs' buffer first) of every graph step."""
    from ernieserve.worker import cuda_graph, mixed_graph

    feeds: list[tuple[int, bool]] = []
    feed_inputs = cuda_graph.feed_inputs

    def counted(sampled, prev, num_fed):
        feeds.append((num_fed, feed_inputs(sampled, prev, num_fed)))
        return feeds[-1][1]

    monkeypatch.setattr(mixed_graph, "feed_inputs", counted)
    monkeypatch.setattr(cuda_graph, "feed_inputs", counted)
    return feeds


@pytest.mark.parametrize("budget", [2048, 3], ids=["whole-prompts", "one-token-chunks"])
def test_in_graph_sampling_equals_eager(tiny_ernie, monkeypatch, budget):
    eager = _run(_engine(tiny_ernie, monkeypatch, False, budget), _params())
    llm = _engine(tiny_ernie, monkeypatch, True, budget)
    feeds = _count_feeds(monkeypatch)
    graphed = _run(llm, _params())
    assert llm.llm_engine.core.runner.graphs.replays > 0
    assert graphed == eager
    # decode graphs after decode graphs feed from the view the previous step kept: no copy
    assert any(n and not copied for n, copied in feeds), feeds


def test_full_sampler_on_graph_logits(tiny_ernie, monkeypatch):
    """top_k and logprobs are the eager sampler's: it runs on the logits the graph computed."""
    params = _params()
    params[2] = SamplingParams(temperature=1.3, seed=12, top_k=5, max_tokens=10, ignore_eos=True, logprobs=2)
    eager_llm = _engine(tiny_ernie, monkeypatch, False, 2048)
    eager = eager_llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    llm = _engine(tiny_ernie, monkeypatch, True, 2048)
    graphed = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in eager]
    lp_eager = [d[t].logprob for t, d in zip(eager[2].outputs[0].token_ids, eager[2].outputs[0].logprobs)]
    lp_graph = [d[t].logprob for t, d in zip(graphed[2].outputs[0].token_ids, graphed[2].outputs[0].logprobs)]
    assert len(lp_graph) == 10 and lp_graph == pytest.approx(lp_eager, abs=1e-4)


def test_three_d_rotary_positions_through_the_graph_buffers(checkpoint_factory, monkeypatch):
    """ERNIE-VL (text prompts): [3, bs] positions travel in the packed buffers too."""
    model = checkpoint_factory("tiny-ernie-4.5-vl")
    eager = _run(_engine(model, monkeypatch, False, 2048), _params())
    llm = _engine(model, monkeypatch, True, 2048)
    assert llm.llm_engine.core.runner.graphs.mrope
    assert _run(llm, _params()) == eager
    assert llm.llm_engine.core.runner.graphs.replays > 0


# ---- mixed prefill+decode steps from graphs (--graph-optimization-config cudagraph_mixed_steps) ----

class FakeMixedGraphRunner(MixedGraphRunner):
    def capture(self) -> None:
        self.replays = 0
        self.graphs = {t: FakeGraph(self, t) for t in self.sizes}


def _mixed_engine(model, monkeypatch, budget: int) -> LLM:
    llm = _engine(model, monkeypatch, True, budget)
    runner = llm.llm_engine.core.runner
    runner.mixed_graphs = FakeMixedGraphRunner(runner.model, runner.backend, budget, 8, 128, 16, runner.device,
                                               sampled=runner.graphs.sampled)  # shared, as ModelRunner does
    runner.mixed_graphs.capture()
    return llm


@pytest.mark.parametrize("budget", [48, 20], ids=["whole-prompts", "chunked"])
def test_mixed_steps_from_graphs_equal_eager(tiny_ernie, monkeypatch, budget):
    """Prefill chunks and decodes padded to a token bucket, requests padded to max_num_seqs: the
    same greedy and seeded tokens as eager, through the packed sampling rows."""
    eager = _run(_engine(tiny_ernie, monkeypatch, False, budget), _params())
    llm = _mixed_engine(tiny_ernie, monkeypatch, budget)
    feeds = _count_feeds(monkeypatch)
    graphed = _run(llm, _params())
    assert llm.llm_engine.core.runner.mixed_graphs.replays > 0
    assert graphed == eager
    print(f"\nfeeds (ids, copied): {feeds}")
    assert any(n and not copied for n, copied in feeds), feeds


@pytest.mark.parametrize("experts", ["reference", "fused-triton"])
def test_mixed_steps_from_graphs_equal_eager_on_a_moe_model(checkpoint_factory, monkeypatch, experts):
    """Padded tokens are routed to experts like real ones (their rows are dropped later). With
    "fused-triton" the experts run the GPU's grouped kernels (interpreted), whose expert-aligned
    sort sees the padded token count, as under a CUDA graph."""
    unsummed: list[bool] = []
    if experts == "fused-triton":
        from ernieserve.layers.moe import fused_moe as fm
        from ernieserve.layers.quantization.moe import UnquantizedMoEMethod

        def fused(self, layer, x, topk_weights, topk_ids, sum_slots=True):
            # with sum_slots=False the next RMSNorm adds the per-slot outputs (layers/moe/layer.py)
            unsummed.append(not sum_slots)
            return fm.fused_moe_triton(x, layer.w13, layer.w2, topk_weights, topk_ids, sum_slots=sum_slots)

        monkeypatch.setattr(UnquantizedMoEMethod, "apply", fused)
    model = checkpoint_factory("tiny-ernie-4.5-moe")
    eager = _run(_engine(model, monkeypatch, False, 20), _params())
    llm = _mixed_engine(model, monkeypatch, 20)
    assert _run(llm, _params()) == eager
    assert llm.llm_engine.core.runner.mixed_graphs.replays > 0
    if experts == "fused-triton":  # the norms added the MoE layers' slot outputs themselves
        assert unsummed and all(unsummed)


def test_mixed_token_buckets():
    from ernieserve.worker.mixed_graph import mixed_token_sizes

    assert mixed_token_sizes(2048) == [16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert mixed_token_sizes(48) == [16, 32, 48]
    assert mixed_token_sizes(300) == [16, 32, 64, 128, 256, 300]


def test_graphs_under_preemption(tiny_ernie, monkeypatch):
    """Six KV blocks for six requests that grow past them: requests are preempted (some with a token
    still in flight on the device) and resumed; decode and mixed graphs give eager's tokens."""
    eager_llm = _engine(tiny_ernie, monkeypatch, False, 2048, blocks=6)
    eager = _run(eager_llm, _params())
    assert eager_llm.llm_engine.core.scheduler.num_preempted_total > 0
    llm = _engine(tiny_ernie, monkeypatch, True, 2048, blocks=6)
    runner = llm.llm_engine.core.runner
    runner.mixed_graphs = FakeMixedGraphRunner(runner.model, runner.backend, 2048, 8, 128, 16, runner.device,
                                               sampled=runner.graphs.sampled)
    runner.mixed_graphs.capture()
    assert _run(llm, _params()) == eager
    assert runner.graphs.replays > 0 and runner.mixed_graphs.replays > 0

