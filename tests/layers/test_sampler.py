"""Sampler tests: each result is checked against a direct, per-row Python computation."""

from __future__ import annotations

import math

import pytest
import torch

from ernieserve.layers import sampler as sampler_module
from ernieserve.layers.sampler import (
    Sampler,
    apply_penalties,
    apply_top_k_top_p,
    compute_logprobs,
)
from ernieserve.layers.sampling_metadata import SamplingMetadata

NEG_INF = float("-inf")


def make_meta(temperature: list[float], **fields: object) -> SamplingMetadata:
    temps = torch.tensor(temperature, dtype=torch.float32)
    greedy = [t == 0.0 for t in temperature]
    return SamplingMetadata(
        temperature=temps, all_greedy=all(greedy), all_random=not any(greedy), **fields
    )


def pad_ids(rows: list[list[int]], pad: int) -> torch.Tensor:
    """[B, max_len] int64 padded with `pad`, as the input batch builds them."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Greedy and top_k = 1
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = torch.randn(6, 97, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = Sampler()(logits, make_meta([0.0] * 6))
    expected = [max(range(97), key=lambda v: float(row[v])) for row in logits.float()]
    assert out.sampled_token_ids.tolist() == expected
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.logprobs is None


def test_top_k_one_equals_greedy() -> None:
    logits = torch.randn(32, 500, generator=torch.Generator().manual_seed(1))
    greedy = Sampler()(logits, make_meta([0.0] * 32)).sampled_token_ids
    top_k = torch.ones(32, dtype=torch.int64)
    for top_p in (None, torch.full((32,), 0.9)):
        meta = make_meta([1.3] * 32, top_k=top_k, top_p=top_p)
        assert torch.equal(Sampler()(logits, meta).sampled_token_ids, greedy)
    # Tied maxima (common in bf16): top_k = 1 keeps the one argmax picks, the first.
    tied = torch.randint(0, 3, (32, 500), generator=torch.Generator().manual_seed(8)).float()
    meta = make_meta([1.3] * 32, top_k=top_k)
    expected = [row.index(max(row)) for row in tied.tolist()]
    assert Sampler()(tied, meta).sampled_token_ids.tolist() == expected


# ----------------------------------------------------------------------------------------------
# Seeded reproducibility
# ----------------------------------------------------------------------------------------------


def run_seeded(batch: torch.Tensor, seeds: dict[int, int], steps: int = 6) -> list[list[int]]:
    """Sample `steps` times from the same logits; returns per-step token lists. As the input batch
    does, each step's key mixes the seed with the output position."""
    torch.manual_seed(1234 + batch.shape[0])  # the default generator only feeds unseeded rows
    out = []
    for step in range(steps):
        meta = make_meta([1.0] * batch.shape[0], seeds={r: s * 1_000_003 + step for r, s in seeds.items()})
        out.append(Sampler()(batch, meta).sampled_token_ids.tolist())
    return out


def test_seeded_rows_reproducible_across_batches() -> None:
    g = torch.Generator().manual_seed(2)
    x, y, z = (torch.randn(1, 1000, generator=g) for _ in range(3))
    alone = [step[0] for step in run_seeded(x, {0: 7})]
    # Same request at row 2, next to an unseeded row and another seeded row.
    crowded = [step[2] for step in run_seeded(torch.cat([y, z, x]), {1: 8, 2: 7})]
    assert alone == crowded
    other_seed = [step[0] for step in run_seeded(x, {0: 9})]
    assert other_seed != alone
    # Flat-ish logits over 1000 tokens: six draws should not all coincide.
    assert len(set(alone)) > 1


# ----------------------------------------------------------------------------------------------
# Filters: distribution of many samples
# ----------------------------------------------------------------------------------------------


def reference_probs(
    logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float
) -> list[float]:
    """Temperature, min_p, top_k, top_p, each renormalising, written out per token."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    probs = [math.exp(x - top) for x in scaled]
    probs = [p / sum(probs) for p in probs]
    allowed = {v for v, p in enumerate(probs) if p >= min_p * max(probs)}
    by_logit = sorted(allowed, key=lambda v: -scaled[v])
    if top_k > 0:
        by_logit = by_logit[:top_k]
    total = sum(probs[v] for v in by_logit)
    kept: list[int] = []
    mass = 0.0
    for v in by_logit:
        if mass >= top_p:
            break
        kept.append(v)
        mass += probs[v] / total
    total = sum(probs[v] for v in kept)
    return [probs[v] / total if v in kept else 0.0 for v in range(len(logits))]


FILTER_CASES = [
    # temperature, top_k, top_p, min_p
    (1.0, 0, 0.7, 0.0),
    (1.0, 4, 1.0, 0.0),
    (1.0, 0, 1.0, 0.2),
    (0.7, 5, 0.8, 0.02),
    (1.5, 6, 0.9, 0.0),
]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", FILTER_CASES)
def test_filtered_sample_distribution(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    row = [2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -1.9]
    n = 20000
    meta = make_meta(
        [temperature] * n,
        top_k=torch.full((n,), top_k, dtype=torch.int64),
        top_p=torch.full((n,), top_p),
        min_p=torch.full((n,), min_p),
    )
    torch.manual_seed(0)
    tokens = Sampler()(torch.tensor([row]).expand(n, -1), meta).sampled_token_ids
    counts = torch.bincount(tokens, minlength=len(row)).tolist()
    expected = reference_probs(row, temperature, top_k, top_p, min_p)
    for v, p in enumerate(expected):
        if p == 0.0:
            assert counts[v] == 0, f"token {v} is filtered out but was sampled {counts[v]} times"
    chi_square = sum((counts[v] - n * p) ** 2 / (n * p) for v, p in enumerate(expected) if p > 0)
    # At most 7 degrees of freedom: the 99.9% quantile is 24.3.
    assert chi_square < 25.0, (counts, expected)


def test_top_k_top_p_mask_matches_reference() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=g) * 2
    top_k = torch.tensor([0, 1, 5, 40, 7, 0])
    top_p = torch.tensor([1.0, 0.5, 0.9, 0.3, 1.0, 0.6])
    out = logits.clone()
    apply_top_k_top_p(out, top_k, top_p)
    for b in range(6):
        ref = reference_probs(logits[b].tolist(), 1.0, int(top_k[b]), float(top_p[b]), 0.0)
        kept = [v for v in range(40) if out[b, v] != NEG_INF]
        assert kept == [v for v in range(40) if ref[v] > 0], b
        assert torch.equal(out[b, kept], logits[b, kept])  # kept logits are unchanged
    # Four equal tokens: the first two reach top_p = 0.5 exactly, so the set stops there.
    flat = torch.zeros(1, 4)
    apply_top_k_top_p(flat, None, torch.tensor([0.5]))
    assert flat.tolist() == [[0.0, 0.0, NEG_INF, NEG_INF]]


def test_no_sort_without_top_k_or_top_p(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("sorted although neither top_k nor top_p is set")

    monkeypatch.setattr(sampler_module.torch, "sort", forbidden)
    meta = make_meta([1.0, 0.0], min_p=torch.tensor([0.1, 0.0]))
    Sampler()(torch.randn(2, 50), meta)
    with pytest.raises(AssertionError):
        Sampler()(torch.randn(2, 50), make_meta([1.0, 1.0], top_k=torch.tensor([3, 0])))


# ----------------------------------------------------------------------------------------------
# Penalties, min_tokens, bad words
# ----------------------------------------------------------------------------------------------

PROMPTS = [[1, 2, 2, 3], [4], [5, 6, 7, 8, 9], [0, 1]]
OUTPUTS = [[3, 3, 10, 11, 3], [4, 4, 12], [], [1, 13, 13, 13]]
REPETITION = [1.3, 0.8, 2.0, 1.0]
PRESENCE = [0.5, -0.4, 1.0, 0.0]
FREQUENCY = [0.25, 0.3, -1.0, 1.5]


def reference_penalised(logits: list[float], b: int) -> list[float]:
    out = list(logits)
    for v in range(len(out)):
        if v in PROMPTS[b] or v in OUTPUTS[b]:
            out[v] = out[v] / REPETITION[b] if out[v] > 0 else out[v] * REPETITION[b]
        count = OUTPUTS[b].count(v)
        out[v] -= FREQUENCY[b] * count + PRESENCE[b] * (count > 0)
    return out


def penalty_meta(vocab_size: int, temperature: list[float]) -> SamplingMetadata:
    return make_meta(
        temperature,
        repetition_penalties=torch.tensor(REPETITION),
        presence_penalties=torch.tensor(PRESENCE),
        frequency_penalties=torch.tensor(FREQUENCY),
        prompt_token_ids=pad_ids(PROMPTS, vocab_size),
        output_token_ids=pad_ids(OUTPUTS, vocab_size),
    )


def test_penalties_match_reference() -> None:
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(4)) * 3
    out = logits.clone()
    apply_penalties(out, penalty_meta(16, [1.0] * 4))
    for b in range(4):
        assert out[b].tolist() == pytest.approx(reference_penalised(logits[b].tolist(), b))


def test_penalties_change_the_greedy_token() -> None:
    logits = torch.zeros(4, 16)
    logits[:, 3] = 1.0  # row 0 repeats token 3, which the penalties must push below token 15
    logits[:, 15] = 0.9
    out = Sampler()(logits, penalty_meta(16, [0.0] * 4)).sampled_token_ids.tolist()
    penalised = [reference_penalised(logits[b].tolist(), b) for b in range(4)]
    expected = [row.index(max(row)) for row in penalised]
    assert out == expected
    assert out[0] == 15 and out[1] == 3


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    eos, stop = 9, 8
    logits = torch.zeros(4, 10)
    logits[:, eos], logits[:, stop], logits[:, 2] = 3.0, 2.0, 1.0
    meta = make_meta(
        [0.0] * 4,
        min_tokens={0: (3, [eos, stop]), 1: (3, [eos, stop]), 3: (5, [eos])},
        output_token_lists=[[1], [1, 1, 1], [1], [1, 2]],
    )
    out = Sampler()(logits, meta).sampled_token_ids.tolist()
    # row 0: 1 < 3, both banned; row 1: 3 >= 3, free; row 2: no rule; row 3: only eos banned
    assert out == [2, eos, eos, stop]


def test_bad_words_single_and_multi_token() -> None:
    logits = torch.zeros(5, 10)
    logits[:, 7], logits[:, 4] = 2.0, 1.0
    bad = [[5, 6, 7], [3]]
    meta = make_meta(
        [0.0] * 5,
        bad_words_token_ids={0: bad, 1: bad, 2: bad, 3: [[7]], 4: [[6, 4], [9, 7]]},
        output_token_lists=[[1, 5, 6], [5, 6, 1], [6], [], [0, 6]],
    )
    out = Sampler()(logits, meta).sampled_token_ids.tolist()
    # row 0 ends with [5, 6] -> 7 banned; rows 1, 2 do not; row 3 bans 7 outright;
    # row 4 ends with 6 -> 4 banned, but not 7, so 7 stays the argmax
    assert out == [4, 7, 7, 4, 7]
    logits[4, 4] = 5.0
    assert Sampler()(logits, meta).sampled_token_ids.tolist()[4] == 7


# ----------------------------------------------------------------------------------------------
# Logprobs and mixed batches
# ----------------------------------------------------------------------------------------------


def check_logprobs(logits: torch.Tensor, chosen: list[int], k: int, got: object) -> None:
    token_ids, logprobs, ranks = got.tolists()  # type: ignore[attr-defined]
    for b, row in enumerate(logits.float().tolist()):
        top = max(row)
        log_total = top + math.log(sum(math.exp(x - top) for x in row))
        ref = [x - log_total for x in row]
        assert token_ids[b][0] == chosen[b]
        # The top-k values are the k largest; compared by value, since bf16 rows can hold ties.
        assert logprobs[b][1:] == pytest.approx(sorted(ref, reverse=True)[:k], abs=1e-5)
        assert len(set(token_ids[b][1:])) == k
        assert logprobs[b] == pytest.approx([ref[v] for v in token_ids[b]], abs=1e-5)
        assert ranks[b] == 1 + sum(x > ref[chosen[b]] for x in ref)


@pytest.mark.parametrize("k", [0, 4])
def test_logprobs_are_raw(k: int) -> None:
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(5)) * 2
    meta = penalty_meta(16, [0.0, 1.0, 0.7, 0.0])
    meta.max_num_logprobs = k
    torch.manual_seed(0)
    out = Sampler()(logits, meta)
    assert out.logprobs is not None
    assert out.logprobs.token_ids.shape == (4, k + 1)
    assert out.logprobs.logprobs.dtype == torch.float32
    check_logprobs(logits, out.sampled_token_ids.tolist(), k, out.logprobs)


def test_compute_logprobs_for_given_tokens() -> None:
    logits = torch.randn(7, 30, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    chosen = [0, 29, 5, 5, 13, 2, 17]
    got = compute_logprobs(logits, torch.tensor(chosen), 3)
    check_logprobs(logits, chosen, 3, got)


def test_mixed_greedy_and_random_batch() -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 1000, generator=g)
    temps = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    seeds = {1: 11, 3: 12, 5: 13}
    generators = dict(seeds)
    meta = make_meta(temps, seeds=generators, top_k=torch.tensor([1, 0, 2, 50, 0, 0]))
    before = logits.clone()
    out = Sampler()(logits, meta).sampled_token_ids.tolist()
    assert torch.equal(logits, before)  # the sampler works on a copy of the caller's logits
    argmax = logits.argmax(dim=-1).tolist()
    for row in (0, 2, 4):
        assert out[row] == argmax[row]
    # Each random row samples as it would alone in an all-random batch with the same seed.
    for row, seed in seeds.items():
        top_k = torch.tensor([[0, 0, 0, 50, 0, 0][row]])
        alone = make_meta([1.0], seeds={0: seed}, top_k=top_k)
        assert Sampler()(logits[row : row + 1], alone).sampled_token_ids.tolist() == [out[row]]
    assert any(out[row] != argmax[row] for row in seeds)


def test_seeded_draws_follow_the_distribution_across_seeds():
    """One draw per seed, many seeds: the counter-hash noise must still sample probs faithfully."""
    from ernieserve.layers.sampler import hashed_uniform

    u = hashed_uniform(torch.arange(64, dtype=torch.int64) * 7919, 4096)
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().expand(4000, 4).contiguous()
    meta = make_meta([1.0] * 4000, seeds={row: row * 1_000_003 + 17 for row in range(4000)})
    counts = torch.bincount(Sampler()(logits, meta).sampled_token_ids, minlength=4).float()
    expected = probs * 4000
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3  # p = 0.001 at 3 degrees of freedom
