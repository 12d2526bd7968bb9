"""ERNIE 4.5 MoE and Qwen3-MoE against Hugging Face transformers on tiny random checkpoints.

Each checkpoint is written by HF's own `save_pretrained` (per-expert tensor names, ERNIE's float32
gate and score-correction bias), loaded by our streaming loader, and run through the paged
attention reference with KV caches: logits under teacher forcing (whole prompts, and prompts in
chunks on top of cached context), then greedy decoding in a batch, with one request "preempted"
(its blocks dropped and its prompt + outputs recomputed in a mixed prefill/decode step), checked
against HF `generate`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # see tests/layers/test_moe.py: kernels are decorated at import
    os.environ["TRITON_INTERPRET"] = "1"

from ernieserve.attention.torch_ref import TorchRefBackend  # noqa: E402
from ernieserve.config import EngineArgs  # noqa: E402
from ernieserve.sampling_params import SamplingParams  # noqa: E402
from ernieserve.worker.input_batch import CachedRequestState, build_step_inputs  # noqa: E402
from ernieserve.worker.model_runner import ModelRunner  # noqa: E402

BLOCK_SIZE = 16
VOCAB = 256


def _peaked(model: torch.nn.Module) -> None:
    """A large final-norm weight makes logits peaked, so greedy choices are far from ties."""
    with torch.no_grad():
        model.model.norm.weight.fill_(8.0)


def save_ernie_moe(path: Path) -> torch.nn.Module:
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    cfg = Ernie4_5_MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, moe_intermediate_size=32, moe_k=2,
        moe_num_experts=6, moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=3,
        moe_layer_interval=1, tie_word_embeddings=True, use_bias=False)
    torch.manual_seed(0)
    model = Ernie4_5_MoeForCausalLM(cfg).float().eval()
    _peaked(model)
    with torch.no_grad():  # a real bias: it must change which experts are picked, not their weights
        for layer in model.model.layers[1:]:
            layer.mlp.gate.moe_statics.e_score_correction_bias.normal_(0.0, 0.05)
    model.save_pretrained(path)
    return model


def save_qwen3_moe(path: Path) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, moe_intermediate_size=32,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0], decoder_sparse_step=1,
        tie_word_embeddings=False)
    torch.manual_seed(1)
    model = Qwen3MoeForCausalLM(cfg).float().eval()
    _peaked(model)
    model.save_pretrained(path)
    return model


class Driver:
    """Runs our model step by step with hand-scheduled token counts and block tables."""

    def __init__(self, model_dir: Path) -> None:
        cfg = EngineArgs(model=str(model_dir), device="cpu", num_gpu_blocks_override=64, block_size=BLOCK_SIZE,
                         max_model_len=256).create_engine_config()
        self.runner = ModelRunner(cfg, TorchRefBackend())
        self.runner.initialize_kv_cache()
        self.states: dict[str, CachedRequestState] = {}
        self.next_block = 0

    def add(self, rid: str, prompt: list[int], max_len: int = 64) -> None:
        n = -(-max_len // BLOCK_SIZE)
        blocks = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        self.states[rid] = CachedRequestState(rid, list(prompt), list(prompt), SamplingParams(temperature=0.0),
                                              blocks, 0)

    @torch.inference_mode()
    def step(self, num_tokens: dict[str, int]) -> dict[str, torch.Tensor]:
        """Runs the next num_tokens[rid] tokens of each request; returns their logits [n, vocab]."""
        step = build_step_inputs(self.states, num_tokens, BLOCK_SIZE)
        model = self.runner.model
        hidden = model(*self.runner._device_inputs(step))
        logits = model.compute_logits(hidden)
        out = {}
        for i, rid in enumerate(step.req_ids):
            out[rid] = logits[int(step.query_start_loc[i]):int(step.query_start_loc[i + 1])]
            self.states[rid].num_computed_tokens += num_tokens[rid]
        return out


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


PROMPTS = [[5, 17, 99, 3, 42, 250, 7], list(range(30, 49)), [200, 1, 64, 64, 9, 11, 13, 120, 77, 31, 6, 88]]
CHUNKS = [3, 8, 5]  # first chunk of each prompt in the chunked run


@pytest.fixture(scope="module", params=["ernie4_5_moe", "qwen3_moe"])
def checkpoint(request, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp(request.param)
    model = save_ernie_moe(path) if request.param == "ernie4_5_moe" else save_qwen3_moe(path)
    return path, model


def test_builds_sparse_and_dense_layers(checkpoint) -> None:
    from ernieserve.layers.moe import FusedMoE
    from ernieserve.models.decoder import DecoderMLP

    path, hf = checkpoint
    model = Driver(path).runner.model
    for ours, theirs in zip(model.model.layers, hf.model.layers):
        sparse = hasattr(theirs.mlp, "experts")
        assert isinstance(getattr(ours.mlp, "experts", None), FusedMoE) == sparse
        assert isinstance(ours.mlp, DecoderMLP) == (not sparse)
        if sparse:  # stacked weights equal HF's own stacked in-memory layout
            num = theirs.mlp.experts.gate_up_proj.shape[0]
            assert torch.equal(ours.mlp.experts.w13[:num], theirs.mlp.experts.gate_up_proj)
            assert torch.equal(ours.mlp.experts.w2[:num], theirs.mlp.experts.down_proj)
            shared = getattr(theirs.mlp, "shared_experts", None)
            if shared is not None:  # folded in as experts num.., a chunk of the intermediate units each
                slots = ours.mlp.num_folded_shared
                assert slots > 0 and ours.mlp.experts.w13.shape[0] == num + slots
                inter = ours.mlp.experts.inter
                for s in range(slots):
                    units = slice(s * inter, (s + 1) * inter)
                    assert torch.equal(ours.mlp.experts.w13[num + s, :inter], shared.gate_proj.weight[units])
                    assert torch.equal(ours.mlp.experts.w13[num + s, inter:], shared.up_proj.weight[units])
                    assert torch.equal(ours.mlp.experts.w2[num + s], shared.down_proj.weight[:, units])
            bias = getattr(theirs.mlp.gate, "moe_statics", None)
            if bias is not None:
                torch.testing.assert_close(ours.mlp.gate.e_score_correction_bias, bias.e_score_correction_bias[0])


def test_prefill_logits_match_hf(checkpoint) -> None:
    path, hf = checkpoint
    drv = Driver(path)
    for i, p in enumerate(PROMPTS):
        drv.add(f"r{i}", p)
    out = drv.step({f"r{i}": len(p) for i, p in enumerate(PROMPTS)})
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(out[f"r{i}"], hf_logits(hf, p), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_logits_match_hf(checkpoint) -> None:
    path, hf = checkpoint
    drv = Driver(path)
    for i, p in enumerate(PROMPTS):
        drv.add(f"r{i}", p)
    first = drv.step({f"r{i}": c for i, c in enumerate(CHUNKS)})
    rest = drv.step({f"r{i}": len(p) - c for i, (p, c) in enumerate(zip(PROMPTS, CHUNKS))})
    for i, p in enumerate(PROMPTS):
        got = torch.cat([first[f"r{i}"], rest[f"r{i}"]])
        torch.testing.assert_close(got, hf_logits(hf, p), atol=1e-4, rtol=1e-4)


def test_greedy_decode_with_preemption_matches_hf_generate(checkpoint) -> None:
    path, hf = checkpoint
    new_tokens = 6
    hf.generation_config.eos_token_id = None  # run the full length
    expected = []
    for p in PROMPTS:
        with torch.no_grad():
            ids = hf.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        expected.append(ids[0, len(p):].tolist())

    drv = Driver(path)
    rids = [f"r{i}" for i in range(len(PROMPTS))]
    for rid, p in zip(rids, PROMPTS):
        drv.add(rid, p)
    sched = {rid: len(p) for rid, p in zip(rids, PROMPTS)}
    for step in range(new_tokens):
        if step == 3:  # preempt r1: recompute its prompt + outputs in fresh blocks, beside decodes
            st = drv.states.pop("r1")
            drv.add("r1", st.prompt_token_ids)
            drv.states["r1"].token_ids = list(st.token_ids)
            sched["r1"] = len(st.token_ids)
        logits = drv.step(sched)
        for rid in rids:
            drv.states[rid].token_ids.append(int(logits[rid][-1].argmax()))
            sched[rid] = 1
    got = [drv.states[rid].output_token_ids for rid in rids]
    assert got == expected
