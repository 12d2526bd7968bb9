"""Our models against Hugging Face transformers' own modeling code, on the same safetensors.

Logits under teacher forcing (float32, tight tolerance) and greedy generations for a batch of
mixed-length prompts: plain, with chunked prefill, and with so few KV blocks that requests are
preempted and recomputed.
"""

from __future__ import annotations

import pytest
import torch

from ernieserve import LLM, SamplingParams
from ernieserve.config import EngineArgs
from ernieserve.worker.input_batch import CachedRequestState, build_step_inputs
from ernieserve.worker.model_runner import ModelRunner
DENSE_PRESETS = ["tiny-ernie-4.5", "tiny-ernie-4.5-bias", "tiny-qwen3", "tiny-qwen2", "tiny-llama"]

PROMPT_LENS = [1, 3, 7, 12, 16, 23, 31, 40]
NEW_TOKENS = 10


def prompts_for(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Argmax decoding with HF's forward, one full pass per token. (HF `generate` would apply the
    checkpoint's generation_config, e.g. Qwen2's repetition_penalty, which is not plain greedy.)"""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@torch.inference_mode()
def our_prefill_logits(runner: ModelRunner, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All-position logits of a batch of prompts in one varlen step through the paged cache."""
    bs = runner.block_size
    states, sched, next_block = {}, {}, 0
    for i, p in enumerate(prompts):
        nb = -(-len(p) // bs)
        states[str(i)] = CachedRequestState(str(i), p, list(p), SamplingParams(), list(range(next_block, next_block + nb)), 0)
        next_block += nb
        sched[str(i)] = len(p)
    step = build_step_inputs(states, sched, bs)
    hidden = runner.model(*runner._device_inputs(step))
    logits = runner.model.compute_logits(hidden)
    qsl = step.query_start_loc
    return [logits[qsl[i]:qsl[i + 1]] for i in range(len(prompts))]


@pytest.mark.parametrize("preset", DENSE_PRESETS)
def test_teacher_forced_logits_match_hf(checkpoint_factory, preset):
    path = checkpoint_factory(preset)
    config = EngineArgs(model=str(path), device="cpu", num_gpu_blocks_override=64, block_size=16,
                        max_model_len=512).create_engine_config()
    runner = ModelRunner(config)
    runner.initialize_kv_cache()
    hf = hf_model(path)
    prompts = prompts_for(config.model.vocab_size)
    ours = our_prefill_logits(runner, prompts)
    for prompt, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits, ref, atol=2e-4, rtol=1e-4)
        # the checkpoint's logits are peaked, so argmax is a meaningful comparison
        assert torch.equal(logits.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("preset", DENSE_PRESETS)
@pytest.mark.parametrize("mode", ["plain", "chunked", "preempt"])
def test_greedy_batch_matches_hf(checkpoint_factory, preset, mode):
    path = checkpoint_factory(preset)
    kwargs = dict(device="cpu", max_model_len=256, block_size=16, num_gpu_blocks_override=64)
    if mode == "chunked":
        kwargs["max_num_batched_tokens"] = 16  # the longer prompts take 2-3 steps, mixed with decodes
    if mode == "preempt":
        kwargs["num_gpu_blocks_override"] = 8  # 128 tokens for 8 requests of up to 50 tokens
    llm = LLM(model=str(path), **kwargs)
    prompts = prompts_for(llm.llm_engine.config.model.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    hf = hf_model(path)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens"
    if mode == "preempt":
        assert llm.llm_engine.core.scheduler.num_preempted_total > 0, "the test must actually preempt"
    if mode == "chunked":
        assert llm.llm_engine.config.scheduler.max_num_batched_tokens < max(PROMPT_LENS)
