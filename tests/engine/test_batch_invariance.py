"""A request's greedy output is the same alone, in a full batch, chunked and after preemption."""

from __future__ import annotations

import torch

from ernieserve import LLM, SamplingParams


def test_alone_equals_in_full_batch(tiny_ernie):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(model=str(tiny_ernie), device="cpu", max_model_len=256, block_size=16, num_gpu_blocks_override=128,
              max_num_seqs=16)
    gen = torch.Generator().manual_seed(7)
    batch = [{"prompt_token_ids": torch.randint(10, 1000, (int(n),), generator=gen).tolist()}
             for n in torch.randint(1, 60, (16,), generator=gen)]
    together = llm.generate(batch, params, use_tqdm=False)
    for i in (0, 5, 15):
        alone = llm.generate([batch[i]], params, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == together[i].outputs[0].token_ids
    small = LLM(model=str(tiny_ernie), device="cpu", max_model_len=256, block_size=16, num_gpu_blocks_override=10,
                max_num_batched_tokens=24, max_num_seqs=16)
    squeezed = small.generate(batch, params, use_tqdm=False)
    assert small.llm_engine.core.scheduler.num_preempted_total > 0
    assert [o.outputs[0].token_ids for o in squeezed] == [o.outputs[0].token_ids for o in together]
