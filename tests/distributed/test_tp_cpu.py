"""Tensor parallelism on CPU (gloo): TP=2 computes what TP=1 computes.

Each case runs the same requests through a one-rank engine and a two-rank engine (rank 0 in this
process, rank 1 a spawned worker) and compares greedy tokens exactly and logprobs (of every prompt
token and of every sampled token) within float32 tolerance. The two-rank engine runs with a small
token budget and a small KV cache, so its prompts are chunked and requests are preempted and
recomputed: the step diffs the workers receive cover all of it. MoE models run with experts split
by their intermediate dimension (plain TP) and whole (expert parallelism).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ernieserve.config import EngineArgs
from ernieserve.engine.core import EngineCore
from ernieserve.engine.protocol import EngineRequest
from ernieserve.sampling_params import SamplingParams

BLOCK = 16
MAX_TOKENS = 12
# lengths 40, 23, 51, 9: with a 24-token budget every long prompt is chunked
PROMPTS = [[(7 * i + 3) % 250 + 5 for i in range(40)], list(range(30, 53)),
           [(11 * i) % 240 + 3 for i in range(51)], [200, 1, 64, 64, 9, 11, 13, 120, 77]]


def save_qwen3_moe(path: Path) -> Path:
    """A tiny Qwen3-MoE written by HF itself (6 experts, top-2, one dense layer)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
                         mlp_only_layers=[0], decoder_sparse_step=1, tie_word_embeddings=False)
    torch.manual_seed(1)
    model = Qwen3MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.model.norm.weight.fill_(8.0)  # peaked logits: greedy choices far from ties
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory) -> Path:
    return save_qwen3_moe(tmp_path_factory.mktemp("qwen3-moe"))


def run(path: Path, **engine_kwargs) -> tuple[dict[str, tuple[list[int], list[float], list[float]]], int]:
    """request id -> (tokens, sampled tokens' logprobs, prompt tokens' logprobs); preemptions."""
    config = EngineArgs(model=str(path), device="cpu", max_model_len=256, block_size=BLOCK,
                        **engine_kwargs).create_engine_config()
    core = EngineCore(config)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2,
                                prompt_logprobs=2)
        for i, prompt in enumerate(PROMPTS):
            core.add_request(EngineRequest(request_id=str(i), prompt_token_ids=prompt, sampling_params=params))
        results: dict[str, tuple[list[int], list[float], list[float]]] = {}
        finished: set[str] = set()
        while core.has_unfinished_requests():
            for o in core.step().outputs:
                tokens, lps, prompt_lps = results.setdefault(o.request_id, ([], [], []))
                tokens.extend(o.new_token_ids)
                if o.new_logprobs is not None:
                    lps.extend(row[0] for row in o.new_logprobs.logprobs)
                if o.prompt_logprobs is not None:
                    prompt_lps.extend(row[0] for row in o.prompt_logprobs.logprobs)
                if o.finished:
                    finished.add(o.request_id)
        assert finished == {str(i) for i in range(len(PROMPTS))}
        return results, core.scheduler.num_preempted_total
    finally:
        core.shutdown()


def assert_same(ref: dict, got: dict) -> None:
    complete = 0
    for rid in ref:
        assert got[rid][0] == ref[rid][0], f"request {rid}: greedy tokens differ"
        assert len(got[rid][2]) == len(PROMPTS[int(rid)]) - 1
        torch.testing.assert_close(torch.tensor(got[rid][2]), torch.tensor(ref[rid][2]), atol=2e-4, rtol=0)
        # A request preempted while its token is in flight loses that token's logprob (the runner
        # drops the row with the request's state; at TP=1 too): compare the complete ones.
        if len(got[rid][1]) == len(ref[rid][1]):
            torch.testing.assert_close(torch.tensor(got[rid][1]), torch.tensor(ref[rid][1]), atol=2e-4, rtol=0)
            complete += 1
    assert complete >= len(ref) - 1


# a budget of 24 tokens chunks the prompts; 12 blocks of 16 (192 tokens) cannot hold all four
# requests at full length (40+23+51+9 prompt tokens plus 4 * 12 outputs = 171, rounded up per
# block: 14 blocks), so the newest requests are preempted and recomputed
SQUEEZED = dict(max_num_batched_tokens=24, num_gpu_blocks_override=12, max_num_seqs=4)


def _check_tp2(path: Path, **extra) -> None:
    ref, _ = run(path, num_gpu_blocks_override=64)
    got, preempted = run(path, tensor_parallel_size=2, **SQUEEZED, **extra)
    assert preempted > 0, "the squeezed cache should have forced a preemption"
    assert_same(ref, got)


def test_tp2_dense_ernie(checkpoint_factory):
    _check_tp2(checkpoint_factory("tiny-ernie-4.5"))


@pytest.mark.slow
def test_tp2_dense_qwen3(checkpoint_factory):
    _check_tp2(checkpoint_factory("tiny-qwen3"))


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp-split-experts", "expert-parallel"])
def test_tp2_ernie_moe(checkpoint_factory, expert_parallel):
    _check_tp2(checkpoint_factory("tiny-ernie-4.5-moe"), enable_expert_parallel=expert_parallel)


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp-split-experts", "expert-parallel"])
def test_tp2_qwen3_moe(qwen3_moe, expert_parallel):
    _check_tp2(qwen3_moe, enable_expert_parallel=expert_parallel)


@pytest.mark.parametrize("quantization", [None, pytest.param("wint8", marks=pytest.mark.slow)])
def test_tp2_dummy_weights_are_the_one_rank_model(checkpoint_factory, quantization):
    """--load-format dummy draws the one-rank model and slices it, so TP sizes agree (the GPU
    benchmarks compare TP=2 with TP=1 on dummy weights), quantized experts and layers included
    (groups of 32 and whole experts: the ranks quantize exactly the one-rank model's groups).
    The one-rank model has the same --enable-expert-parallel setting: it decides whether the
    shared experts fold into the routed ones, which changes the order of the random draws."""
    path = checkpoint_factory("tiny-ernie-4.5-moe")
    common = dict(num_gpu_blocks_override=64, load_format="dummy", quantization=quantization,
                  quantization_config='{"group_size": 32}' if quantization else None)
    # quantized: whole experts only (expert parallel); tensor-split experts of 32 rows have halves of
    # 16, smaller than a group, so the ranks' groups cannot be the one-rank model's
    for expert_parallel in (False, True) if quantization is None else (True,):
        ref, _ = run(path, enable_expert_parallel=expert_parallel, **common)
        got, _ = run(path, tensor_parallel_size=2, enable_expert_parallel=expert_parallel, **common)
        assert_same(ref, got)


def test_tp2_quantizes_each_rank_slice(checkpoint_factory):
    """--quantization quantizes whatever slice a rank holds. With groups of 32 the row-parallel
    slices (o_proj 128 -> 64, down_proj 192 -> 96 input features) start on group boundaries, so
    the ranks' quantized weights are exactly the one-rank model's, sliced."""
    path = checkpoint_factory("tiny-ernie-4.5")
    quant = dict(quantization="wint8", quantization_config='{"group_size": 32}', num_gpu_blocks_override=64)
    ref, _ = run(path, **quant)
    got, _ = run(path, tensor_parallel_size=2, **quant)
    assert_same(ref, got)
