"""Fused MoE on the GPU at real shapes (ERNIE-4.5-21B-A3B, Qwen3-30B-A3B) in bf16, eager and under
CUDA graphs, against the float32 torch reference. Run with `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# name: (experts, top_k, hidden, moe_intermediate)
SHAPES = {"ernie-21b-a3b": (64, 6, 2560, 1536), "qwen3-30b-a3b": (128, 8, 2048, 768)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.fixture(scope="module")
def ernie_weights():
    return make_weights(*SHAPES["ernie-21b-a3b"])


def make_weights(num_experts: int, top_k: int, hidden: int, inter: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=g) / hidden**0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=g) / inter**0.5).bfloat16()
    return w13, w2


def route(num_tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ernieserve.layers.moe import RouterConfig
    from ernieserve.layers.moe.fused_moe import triton_select_experts

    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, device="cuda", generator=g)
    cfg = RouterConfig(num_experts, top_k, True, 1e-12, True, False)
    return triton_select_experts(logits, cfg, None)


def reference(x, w13, w2, weights, ids) -> torch.Tensor:
    from ernieserve.layers.moe.fused_moe import fused_moe_ref

    return fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)


@pytest.mark.parametrize("num_tokens", [1, 3, 16, 100, 512, 4096])
def test_fused_matches_reference_ernie_21b(ernie_weights, num_tokens: int) -> None:
    from ernieserve.layers.moe.fused_moe import fused_moe_triton

    w13, w2 = ernie_weights
    num_experts, top_k = w13.shape[0], SHAPES["ernie-21b-a3b"][1]
    x = torch.randn(num_tokens, w13.shape[2], device="cuda").bfloat16()
    weights, ids = route(num_tokens, num_experts, top_k, seed=num_tokens)
    out = fused_moe_triton(x, w13, w2, weights, ids)
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, reference(x, w13, w2, weights, ids)) < 1e-2


@pytest.mark.parametrize("num_tokens,top_k", [(777, 6), (300, 1)])
def test_all_tokens_on_few_experts(ernie_weights, num_tokens: int, top_k: int) -> None:
    """Every token picks the same experts: a few huge experts, all others empty."""
    from ernieserve.layers.moe.fused_moe import fused_moe_triton

    w13, w2 = ernie_weights
    x = torch.randn(num_tokens, w13.shape[2], device="cuda").bfloat16()
    ids = torch.arange(7, 7 + top_k, device="cuda", dtype=torch.int32).repeat(num_tokens, 1)
    weights = torch.softmax(torch.randn(num_tokens, top_k, device="cuda"), -1)
    out = fused_moe_triton(x, w13, w2, weights, ids)
    assert rel_err(out, reference(x, w13, w2, weights, ids)) < 1e-2


def test_qwen3_30b_shape() -> None:
    from ernieserve.layers.moe.fused_moe import fused_moe_triton

    num_experts, top_k, hidden, inter = SHAPES["qwen3-30b-a3b"]
    w13, w2 = make_weights(num_experts, top_k, hidden, inter, seed=1)
    for num_tokens in (1, 64, 2048):
        x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
        weights, ids = route(num_tokens, num_experts, top_k, seed=5)
        assert rel_err(fused_moe_triton(x, w13, w2, weights, ids), reference(x, w13, w2, weights, ids)) < 1e-2


def test_triton_router_matches_reference() -> None:
    from ernieserve.layers.moe import RouterConfig, select_experts
    from ernieserve.layers.moe.fused_moe import triton_select_experts

    for cfg, with_bias in [(RouterConfig(64, 6, True, 1e-12, True, True), True),
                           (RouterConfig(128, 8, True, 0.0, False, False), False),
                           (RouterConfig(128, 8, False, 0.0, False, False), False)]:
        logits = torch.randn(1000, cfg.num_experts, device="cuda")
        bias = torch.randn(cfg.num_experts, device="cuda") * 0.01 if with_bias else None
        ref_w, ref_ids = select_experts(logits, cfg, bias)
        w, ids = triton_select_experts(logits, cfg, bias)
        # tie-breaking may differ on exact ties; random logits have none
        assert torch.equal(ids.long().sort(-1).values, ref_ids.sort(-1).values)
        torch.testing.assert_close(w.sort(-1).values, ref_w.sort(-1).values, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 8, 64, 256])
def test_moe_block_under_cuda_graph(num_tokens: int) -> None:
    """Capture router + fused experts + shared experts once; replay with new inputs (new routing)."""
    from ernieserve.distributed.parallel_state import SINGLE
    from ernieserve.layers.moe import FusedMoE, MoEBlock, RouterConfig, TopKRouter
    from ernieserve.models.decoder import DecoderMLP

    num_experts, top_k, hidden, inter = SHAPES["ernie-21b-a3b"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = MoEBlock(TopKRouter(hidden, RouterConfig(num_experts, top_k, True, 1e-12, True, True), torch.bfloat16),
                         FusedMoE(num_experts, top_k, hidden, inter, torch.bfloat16),
                         DecoderMLP(hidden, inter * 2, False, torch.bfloat16, SINGLE))
        for p in block.parameters():
            p.data.normal_(0, 0.02)
        block.gate.e_score_correction_bias.normal_(0, 0.01)
    static_x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            block(static_x)  # warm-up compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = block(static_x)
        for trial in range(3):
            static_x.copy_(torch.randn(num_tokens, hidden, device="cuda").bfloat16())
            static_out.fill_(float("nan"))  # poison: every element must be rewritten
            graph.replay()
            weights, ids = block.gate(static_x)
            ref = reference(static_x, block.experts.w13, block.experts.w2, weights, ids)
            ref = ref + block.shared_experts(static_x).float()
            assert torch.isfinite(static_out).all()
            assert rel_err(static_out, ref) < 1e-2, f"replay {trial}"


def test_tiny_ernie_moe_matches_hf_on_gpu(tmp_path) -> None:
    """The whole model on CUDA (router kernel + fused experts) against HF, float32, one prefill step."""
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    from ernieserve.attention.torch_ref import TorchRefBackend
    from ernieserve.config import EngineArgs
    from ernieserve.sampling_params import SamplingParams
    from ernieserve.worker.input_batch import CachedRequestState, build_step_inputs
    from ernieserve.worker.model_runner import ModelRunner

    cfg = Ernie4_5_MoeConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, moe_intermediate_size=64, moe_k=2,
        moe_num_experts=8, moe_num_shared_experts=2, moe_layer_start_index=1)
    torch.manual_seed(0)
    hf = Ernie4_5_MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():
        hf.model.norm.weight.fill_(8.0)
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.moe_statics.e_score_correction_bias.normal_(0.0, 0.05)
    hf.save_pretrained(tmp_path)
    hf = hf.cuda()
    engine_cfg = EngineArgs(model=str(tmp_path), device="cuda", dtype="float32", num_gpu_blocks_override=16,
                            block_size=16, max_model_len=256).create_engine_config()
    runner = ModelRunner(engine_cfg, TorchRefBackend())
    runner.initialize_kv_cache()
    prompts = [list(range(3, 40)), [7, 9, 11], [200] * 20]
    states = {f"r{i}": CachedRequestState(f"r{i}", p, list(p), SamplingParams(temperature=0.0),
                                         [3 * i, 3 * i + 1, 3 * i + 2], 0)
              for i, p in enumerate(prompts)}
    step = build_step_inputs(states, {rid: len(s.prompt_token_ids) for rid, s in states.items()}, 16)
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(*runner._device_inputs(step)))
        for i, p in enumerate(prompts):
            ref = hf(torch.tensor([p], device="cuda")).logits[0]
            got = logits[int(step.query_start_loc[i]):int(step.query_start_loc[i + 1])]
            torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("num_tokens", [1, 8, 256, 2048])
def test_folded_shared_experts_at_21b_shapes(num_tokens: int) -> None:
    """ERNIE-4.5-21B-A3B's MoE block (64 experts, top-6, two shared experts of 1536) in bf16: built
    with the shared MLP folded into the grouped GEMMs and loaded from the unfolded block's tensors,
    it gives the unfolded block's output up to bf16 rounding, eagerly and replayed from a CUDA graph."""
    from ernieserve.distributed.parallel_state import TPGroup
    from ernieserve.layers.moe import FusedMoE, MoEBlock, RouterConfig, TopKRouter
    from ernieserve.layers.moe.layer import load_folded_shared
    from ernieserve.models.decoder import DecoderMLP

    experts, top_k, hidden, inter = SHAPES["ernie-21b-a3b"]
    cfg, one = RouterConfig(experts, top_k, True, 1e-12, True, True), TPGroup(0, 1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = MoEBlock(TopKRouter(hidden, cfg, torch.bfloat16),
                         FusedMoE(experts, top_k, hidden, inter, torch.bfloat16, one),
                         DecoderMLP(hidden, 2 * inter, False, torch.bfloat16, one))
        fold = MoEBlock(TopKRouter(hidden, cfg, torch.bfloat16),
                        FusedMoE(experts, top_k, hidden, inter, torch.bfloat16, one, shared_slots=2))
    for p in block.parameters():
        p.data.copy_(torch.randn(p.shape, device="cuda") / p.shape[-1] ** 0.5)
    fold.gate.load_state_dict(block.gate.state_dict())
    fold.experts.w13.data[:experts] = block.experts.w13
    fold.experts.w2.data[:experts] = block.experts.w2
    gate, up = block.shared_experts.gate_up_proj.weight.chunk(2)
    load_folded_shared(fold.experts, "gate", gate)
    load_folded_shared(fold.experts, "up", up)
    load_folded_shared(fold.experts, "down", block.shared_experts.down_proj.weight)
    x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
    with torch.inference_mode():
        unfolded = block(x)
        folded = fold(x)
        graph = torch.cuda.CUDAGraph()
        fold(x)  # warm-up outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            replayed = fold(x)
        graph.replay()
        torch.cuda.synchronize()
    assert rel_err(folded, unfolded) < 1e-2
    assert torch.equal(replayed, folded)
