"""Sampling through the whole engine, each checked against a direct computation."""

from __future__ import annotations

import pytest
import torch

from ernieserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_ernie):
    return LLM(model=str(tiny_ernie), device="cpu", max_model_len=256, block_size=16, num_gpu_blocks_override=128)


@pytest.fixture(scope="module")
def hf(tiny_ernie):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_ernie), dtype=torch.float32).eval()


PROMPT = {"prompt_token_ids": [11, 250, 37, 499, 8, 77]}


def test_seeded_runs_reproduce_and_differ_by_seed(llm):
    p = SamplingParams(temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    a = llm.generate([PROMPT], p, use_tqdm=False)[0].outputs[0].token_ids
    # same seed inside a batch with unseeded neighbours
    batch = [{"prompt_token_ids": [5] * 9}, PROMPT, {"prompt_token_ids": [300, 2]}]
    params = [SamplingParams(temperature=1.0, max_tokens=16), p, SamplingParams(temperature=0.7, max_tokens=5)]
    b = llm.generate(batch, params, use_tqdm=False)[1].outputs[0].token_ids
    c = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=43, max_tokens=16, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0].token_ids
    assert a == b
    assert a != c


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    topk1 = llm.generate([PROMPT], SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)
    assert greedy[0].outputs[0].token_ids == topk1[0].outputs[0].token_ids


def test_logprobs_match_hf_log_softmax(llm, hf):
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    ids = PROMPT["prompt_token_ids"] + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    n = len(PROMPT["prompt_token_ids"])
    assert len(out.logprobs) == 4
    for j, (tok, pos) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[n - 1 + j]
        assert pos[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert pos[tok].rank == 1  # greedy picks the argmax
        top3 = row.topk(3).indices.tolist()
        assert set(top3) <= set(pos)
        assert len(pos) == 3 or len(pos) == 4
    assert out.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(out.token_ids, out.logprobs)))


def test_prompt_logprobs_match_hf(llm, hf):
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    ids = PROMPT["prompt_token_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for p in range(1, len(ids)):
        assert out.prompt_logprobs[p][ids[p]].logprob == pytest.approx(ref[p - 1, ids[p]].item(), abs=1e-4)


def test_penalties_change_greedy_as_direct_computation_says(llm, hf):
    """With a strong repetition penalty the greedy choice is argmax of the penalised logits."""
    n = 6
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, repetition_penalty=1.8,
                            frequency_penalty=0.5, presence_penalty=0.3)
    got = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    ids = list(PROMPT["prompt_token_ids"])
    expected = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        seen = set(ids)
        out_counts: dict[int, int] = {}
        for t in expected:
            out_counts[t] = out_counts.get(t, 0) + 1
        for t in seen:
            logits[t] = logits[t] / 1.8 if logits[t] > 0 else logits[t] * 1.8
        for t, c in out_counts.items():
            logits[t] -= 0.5 * c + 0.3
        tok = int(logits.argmax())
        expected.append(tok)
        ids.append(tok)
    assert got == expected


def test_min_p_keeps_only_likely_tokens(llm, hf):
    with torch.no_grad():
        probs = torch.softmax(hf(torch.tensor([PROMPT["prompt_token_ids"]])).logits[0, -1].float(), -1)
    allowed = set((probs >= 0.3 * probs.max()).nonzero().flatten().tolist())
    params = [SamplingParams(temperature=1.0, min_p=0.3, max_tokens=1, seed=s) for s in range(40)]
    outs = llm.generate([PROMPT] * 40, params, use_tqdm=False)
    assert {o.outputs[0].token_ids[0] for o in outs} <= allowed


def test_stop_strings_and_include_stop_str(llm):
    base = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    text = base[0].outputs[0].text
    assert len(text) > 6, "the tiny model must produce some text for this test"
    stop = text[3:6]
    cut = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop],
                                                include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(llm):
    base = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    ids = base[0].outputs[0].token_ids
    assert base[0].outputs[0].finish_reason == "length" and len(ids) == 8
    stopped = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                   stop_token_ids=[ids[2]]), use_tqdm=False)[0].outputs[0]
    first = ids.index(ids[2])
    assert stopped.token_ids == ids[: first + 1] and stopped.finish_reason == "stop"


def test_min_tokens_suppresses_stop_tokens_until_reached(llm):
    base = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    first = base[0].outputs[0].token_ids[0]
    # without min_tokens the request stops at once on its first (greedy) token
    quick = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[first]),
                         use_tqdm=False)[0].outputs[0]
    assert quick.token_ids == [first]
    held = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[first],
                                                min_tokens=5), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 5 and first not in held.token_ids[:5]


def test_n_returns_independent_samples(llm):
    out = llm.generate([PROMPT], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=1, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_bad_words_ban_single_and_multi_token_sequences(llm):
    base = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    single = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                   bad_words_token_ids=[[base[0]]]), use_tqdm=False)[0].outputs[0]
    assert base[0] not in single.token_ids
    # a two-token sequence bans its second token only right after its first
    pair = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                 bad_words_token_ids=[[base[0], base[1]]]), use_tqdm=False)[0].outputs[0]
    assert pair.token_ids[0] == base[0] and pair.token_ids[1] != base[1]


def test_bad_words_text_is_tokenized_both_spellings(llm):
    tok = llm.get_tokenizer()
    ids = llm.llm_engine.processor._bad_words_ids(["hello"])
    assert tok.encode("hello", add_special_tokens=False) in ids
    assert tok.encode(" hello", add_special_tokens=False) in ids


def test_offline_text_equals_decode_of_tokens(llm):
    """Final-only requests without stop strings are detokenized once at the end: same text."""
    outs = llm.generate([PROMPT, {"prompt_token_ids": [900, 901]}],
                        SamplingParams(temperature=0.8, seed=5, max_tokens=24, ignore_eos=True), use_tqdm=False)
    tok = llm.get_tokenizer()
    for o in outs:
        c = o.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True) and len(c.token_ids) == 24


def test_logprobs_survive_preemption(tiny_ernie):
    """A request preempted while its sampled token is in flight still gets that token's logprob:
    every returned token has one, equal to the run without preemption."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    prompts = [{"prompt_token_ids": [10 + (7 * i + j) % 500 for j in range(20 + 9 * i)]} for i in range(6)]
    roomy = LLM(model=str(tiny_ernie), device="cpu", block_size=16, num_gpu_blocks_override=256)
    tight = LLM(model=str(tiny_ernie), device="cpu", block_size=16, num_gpu_blocks_override=12)
    ref = roomy.generate(prompts, params, use_tqdm=False)
    got = tight.generate(prompts, params, use_tqdm=False)
    assert tight.llm_engine.core.scheduler.num_preempted_total > 0
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(b.outputs[0].logprobs) == len(b.outputs[0].token_ids)
        for la, lb, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, b.outputs[0].token_ids):
            assert abs(la[t].logprob - lb[t].logprob) < 1e-4
