"""The engine on a real GPU: CUDA graphs vs eager, Triton attention vs the torch oracle."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _prompts(n: int, vocab: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 300, (n,), generator=gen).tolist()
    return [{"prompt_token_ids": torch.randint(10, vocab, (k,), generator=gen).tolist()} for k in lens]


@pytest.fixture(scope="module")
def ernie_03b(tmp_path_factory):
    from ernieserve.checkpoint.dummy import write_dummy_checkpoint

    return write_dummy_checkpoint("ernie-4.5-0.3b", tmp_path_factory.mktemp("e03b"), dtype="bfloat16")


def _run(path, prompts, **kw):
    from ernieserve import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=2048, max_num_seqs=64, **kw)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    used_graphs = llm.llm_engine.core.runner.graphs is not None
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs], used_graphs


def test_cuda_graphs_bit_identical_to_eager(ernie_03b):
    prompts = _prompts(48, 103000)
    graphs, used = _run(ernie_03b, prompts)
    eager, _ = _run(ernie_03b, prompts, enforce_eager=True)
    assert used, "the default GPU engine must use CUDA graphs"
    assert graphs == eager


def test_triton_backend_greedy_matches_torch_reference(ernie_03b, monkeypatch):
    """bf16 kernels sum in a different order than the oracle: a near-tie may flip; count them."""
    from ernieserve.attention.torch_ref import TorchRefBackend
    from ernieserve.worker import model_runner

    prompts = _prompts(24, 103000, seed=1)
    fast, _ = _run(ernie_03b, prompts, enforce_eager=True)
    monkeypatch.setattr(model_runner, "select_attention_backend", lambda device: TorchRefBackend())
    ref, _ = _run(ernie_03b, prompts, enforce_eager=True)
    first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(fast, ref)]
    flips = sum(d is not None for d in first_diff)
    print(f"\ngreedy sequences differing (bf16 tie flips): {flips} of {len(prompts)}; first positions {first_diff}")
    # a flip is a divergence at some position; identical prefixes before it show the kernels agree
    assert flips <= len(prompts) // 8
