"""The Gumbel-max race kernel (kernels/sampling.py) against the sampler's torch reference.

CPU through the Triton interpreter at small shapes: vocab sizes that are not multiples of the
block, several splits per row, greedy and random rows in one batch, banned (-inf) ids, ties, keys
with the top bit set. The hash is integer arithmetic, so the noise is bit-identical; the scores
differ only by the interpreter's log, so the ids must be equal unless two scores are within a few
ulps (never at these seeds).
"""

from __future__ import annotations


import pytest
import torch

from interpreter import require_interpreter  # noqa: E402 (tests/kernels)

triton = require_interpreter()

from ernieserve.kernels import sampling  # noqa: E402
from ernieserve.layers.sampler import gumbel_race_reference, hashed_uniform  # noqa: E402


def _case(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (some ids banned), keys, temperatures (some rows greedy: 0, some tiny, some hot)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(torch.bfloat16)  # as the LM head returns them
    logits[:, ::7] = float("-inf")  # banned ids (top_k / min_p / bad words)
    temperature = torch.rand(rows, generator=g) * 1.5 + 0.05
    temperature[torch.rand(rows, generator=g) < 0.3] = 0.0
    keys = torch.randint(-(2**63), 2**63 - 1, (rows,), generator=g, dtype=torch.int64)
    return logits, keys, temperature


@pytest.mark.parametrize("rows,vocab", [(1, 5000), (3, 1000), (5, 2049), (8, 100), (2, 1)])
def test_race_matches_the_reference(rows, vocab, monkeypatch):
    monkeypatch.setattr(sampling, "_TARGET_PROGRAMS", 8)  # several splits per row at these sizes
    logits, keys, temperature = _case(rows, vocab, rows * 1000 + vocab)
    if vocab == 1:
        logits[:] = 0.5
    got = sampling.gumbel_race(logits, keys, temperature)
    assert got.tolist() == gumbel_race_reference(logits, keys, temperature).tolist()
    assert all(got[r] == logits[r].float().argmax() for r in range(rows) if temperature[r] == 0)
    out = torch.full((rows,), -1, dtype=torch.int64)
    assert sampling.gumbel_race(logits.float(), keys, temperature, out=out) is out and torch.equal(out, got)


def test_ties_go_to_the_lowest_id_across_blocks_and_splits(monkeypatch):
    monkeypatch.setattr(sampling, "_TARGET_PROGRAMS", 8)
    logits = torch.full((2, 4000), -1.0)
    logits[:, [1500, 2100, 3999]] = 2.0  # three equal maxima in different blocks and splits
    got = sampling.gumbel_race(logits, torch.zeros(2, dtype=torch.int64), torch.zeros(2))
    assert got.tolist() == [1500, 1500]


def test_seeded_noise_is_the_hash_of_key_and_id():
    """A row whose logits are all equal picks argmax of its Gumbel noise, i.e. of -log(-log(u))."""
    keys = torch.tensor([12345, -(2**63) + 7], dtype=torch.int64)
    logits = torch.zeros(2, 3000)
    got = sampling.gumbel_race(logits, keys, torch.ones(2))
    assert got.tolist() == hashed_uniform(keys, 3000).argmax(dim=-1).tolist()  # -log(-log u) rises with u
