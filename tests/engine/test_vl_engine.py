"""ERNIE 4.5 VL through the whole engine (scheduler, runner, encoder cache, prefix cache) against
Hugging Face transformers' greedy decoding on the same tiny random checkpoint.

The prompts (two images; one video; text only) and the HF fixtures come from
tests/models/test_vl_parity.py, which checks the model alone; here the engine decides the
chunking, the 3-D positions, when to run the vision encoder and what the prefix cache may share.
"""

from __future__ import annotations

import msgspec
import pytest
import torch

from ernieserve.config import EngineArgs
from ernieserve.engine.core import EngineCore
from ernieserve.engine.protocol import EngineRequest
from ernieserve.multimodal.inputs import MultiModalItem
from ernieserve.sampling_params import SamplingParams
from tests.models.test_vl_parity import Prompt, ckpt, hf, hf_logits, prompts  # noqa: F401  (fixtures)

MAX_TOKENS = 6


def hf_greedy(hf, p: Prompt, n: int) -> list[int]:  # noqa: F811
    """Argmax loop over HF's forward on prompt + generated (generated tokens are text)."""
    out: list[int] = []
    for _ in range(n):
        out.append(int(hf_logits(hf, Prompt(p.ids + out, p.items, p.hf_kwargs))[-1].argmax()))
    return out


@pytest.fixture(scope="module")
def expected(hf, prompts) -> list[list[int]]:  # noqa: F811
    return [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]


def run_engine(ckpt_dir, reqs: list[tuple[str, Prompt]], **engine_kw) -> tuple[dict[str, list[int]], EngineCore]:
    kw = dict(model=str(ckpt_dir), device="cpu", block_size=16, num_gpu_blocks_override=64, max_model_len=256)
    core = EngineCore(EngineArgs(**{**kw, **engine_kw}).create_engine_config())
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for rid, p in reqs:
        # across a process boundary the items are msgpack bytes: send them that way here too
        items = msgspec.msgpack.decode(msgspec.msgpack.encode(p.items), type=list[MultiModalItem])
        core.add_request(EngineRequest(request_id=rid, prompt_token_ids=p.ids, sampling_params=params,
                                       mm_items=items))
    got: dict[str, list[int]] = {rid: [] for rid, _ in reqs}
    while core.has_unfinished_requests():
        for o in core.step().outputs:
            got[o.request_id] += o.new_token_ids
    return got, core


@pytest.mark.parametrize("budget", [256, 8], ids=["whole-prompts", "chunks-of-8"])
def test_mixed_batch_matches_hf_greedy(ckpt, prompts, expected, budget):  # noqa: F811
    """Two images, a video and text in one batch; with a budget of 8 tokens a step, prefill
    chunks stop inside image and video runs (each run is 6 to 12 placeholders)."""
    got, core = run_engine(ckpt, [(f"r{i}", p) for i, p in enumerate(prompts)], max_num_batched_tokens=budget,
                           max_num_seqs=4)
    assert [got[f"r{i}"] for i in range(len(prompts))] == expected


def test_preemption_recomputes_images(ckpt, prompts, expected):  # noqa: F811
    """Few blocks: requests are preempted and resumed, re-running the vision encoder."""
    got, core = run_engine(ckpt, [(f"r{i}", p) for i, p in enumerate(prompts)], block_size=8,
                           num_gpu_blocks_override=8, max_num_batched_tokens=64)
    assert [got[f"r{i}"] for i in range(len(prompts))] == expected
    assert core.scheduler.num_preempted_total > 0


def test_prefix_cache_keys_on_image_content(ckpt, hf, prompts, expected):  # noqa: F811
    """The same images again hit the prefix cache; different images behind the same placeholder
    ids must not (their KV differs), and still decode like HF."""
    two_images = prompts[0]
    flipped = [MultiModalItem.from_pixels(it.modality, it.offset, it.length, it.grid_thw, it.pixels().flip(0))
               for it in two_images.items]
    other = Prompt(two_images.ids, flipped,
                   {**two_images.hf_kwargs, "pixel_values": torch.cat([it.pixels() for it in flipped])})
    kw = dict(model=str(ckpt), device="cpu", block_size=16, num_gpu_blocks_override=64, max_model_len=256)
    core = EngineCore(EngineArgs(**kw).create_engine_config())
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    def run(rid: str, p: Prompt) -> tuple[list[int], int]:
        core.add_request(EngineRequest(request_id=rid, prompt_token_ids=p.ids, sampling_params=params,
                                       mm_items=p.items))
        toks, cached = [], 0
        while core.has_unfinished_requests():
            for o in core.step().outputs:
                toks += o.new_token_ids
                cached = max(cached, o.num_cached_tokens)
        return toks, cached

    assert two_images.items[0].offset < 16  # the first block already holds image placeholders
    first, cached0 = run("a", two_images)
    again, cached1 = run("b", two_images)
    assert first == again == expected[0] and cached0 == 0 and cached1 >= 16
    different, cached2 = run("c", other)
    assert cached2 == 0
    assert different == hf_greedy(hf, other, MAX_TOKENS) != first
