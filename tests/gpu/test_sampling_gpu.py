"""The sampler's Gumbel-max race kernel at real shapes (ERNIE's 103,424-token vocabulary).

The kernel against the torch reference on the same GPU, and the whole Sampler on CUDA against the
Sampler on CPU (which runs the torch reference): the hash noise is integer arithmetic and
bit-identical; the scores may differ by an ulp of log, so a draw can differ only where two ids'
scores are that close. The test counts such rows and requires them to be near-ties.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytest.importorskip("triton")

from ernieserve.kernels.sampling import gumbel_race  # noqa: E402
from ernieserve.layers.sampler import Sampler, gumbel_race_reference, hashed_uniform  # noqa: E402
from ernieserve.layers.sampling_metadata import SamplingMetadata  # noqa: E402

VOCAB = 103424


def _scores(logits, keys, temperature):
    noise = -torch.log(-torch.log(hashed_uniform(keys, logits.shape[1]).double()))
    greedy = temperature < 1e-5
    return torch.where(greedy[:, None], logits, logits / torch.where(greedy, 1.0, temperature)[:, None] + noise)


def _assert_same_or_near_tie(got, ref, logits, keys, temperature, max_near_ties=2):
    differ = (got != ref).nonzero().flatten().tolist()
    assert len(differ) <= max_near_ties, f"{len(differ)} rows differ: {differ[:10]}"
    scores = _scores(logits[differ].double(), keys[differ], temperature[differ].double())
    for j, row in enumerate(differ):
        a, b = scores[j, got[row]].item(), scores[j, ref[row]].item()
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), f"row {row}: {a} vs {b} is not a tie"


@pytest.mark.parametrize("rows", [1, 7, 64, 256])
def test_race_matches_reference(rows):
    g = torch.Generator(device="cuda").manual_seed(rows)
    logits = (torch.randn(rows, VOCAB, device="cuda", generator=g) * 4).to(torch.bfloat16)
    logits[:, 1000:2000] = float("-inf")
    temperature = torch.rand(rows, device="cuda", generator=g) + 0.2
    temperature[torch.rand(rows, device="cuda", generator=g) < 0.25] = 0.0
    keys = torch.randint(-(2**63), 2**63 - 1, (rows,), device="cuda", generator=g, dtype=torch.int64)
    got = gumbel_race(logits, keys, temperature)
    ref = gumbel_race_reference(logits, keys, temperature)
    _assert_same_or_near_tie(got, ref, logits.float(), keys, temperature)
    greedy = temperature == 0
    assert torch.equal(got[greedy], logits[greedy].argmax(dim=-1))


def test_sampler_on_cuda_draws_what_it_draws_on_cpu():
    rows = 128
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, VOCAB, generator=g).to(torch.bfloat16)
    temps = torch.rand(rows, generator=g) + 0.3
    temps[::5] = 0.0
    seeds = {r: (r * 7919 + 1) * 2**40 for r in range(rows)}  # large keys: the top bit set for some

    def meta(device):
        m = SamplingMetadata(temperature=temps.to(device), all_greedy=False, all_random=False)
        m.seeds = dict(seeds)
        return m

    cpu = Sampler()(logits, meta("cpu")).sampled_token_ids
    cuda = Sampler()(logits.cuda(), meta("cuda")).sampled_token_ids.cpu()
    keys = torch.tensor([k - 2**64 if k >= 2**63 else k for k in seeds.values()], dtype=torch.int64)
    _assert_same_or_near_tie(cuda, cpu, logits.float(), keys, temps, max_near_ties=2)
