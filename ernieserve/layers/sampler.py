"""Batched sampler: logits [B, V] plus SamplingMetadata -> one token id per row (and logprobs).

Semantics follow vLLM's v1 sampler. The steps, all in float32 on a private copy of the logits:
  1. min_tokens   ban eos/stop ids for rows whose output is still too short
  2. bad_words    ban the last token of each banned sequence whose prefix ends the output
  3. penalties    repetition (prompt + output tokens), presence and frequency (output tokens)
  4. greedy rows  argmax of the processed logits
  5. random rows  temperature, min_p, top_k, top_p, then a Gumbel-max race whose noise is a
                  counter hash of (row key, token id): seeded rows key on (seed, output position),
                  the others on a fresh random key; on CUDA one Triton pass (kernels/sampling.py)
Logprobs are those of the raw model distribution (log_softmax of the incoming logits), taken
before any of the above, as vLLM does by default.

Only the host-side rules (min_tokens, bad_words) loop in Python, over
the few rows that use them; everything else is batched tensor work with no host-device sync.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ernieserve.layers.norm import load_elementwise_kernel, triton_elementwise_enabled
from ernieserve.layers.sampling_metadata import SamplingMetadata

# Same threshold as SamplingParams.greedy: a temperature below it means argmax.
_SAMPLING_EPS = 1e-5


@dataclass(slots=True)
class LogprobsTensors:
    # [N, k+1] int64: column 0 is the chosen token, then the top-k ids by logprob
    token_ids: torch.Tensor
    # [N, k+1] float32: the logprobs of token_ids
    logprobs: torch.Tensor
    # [N] int64: rank of the chosen token in its row (1 = argmax)
    ranks: torch.Tensor

    def tolists(self) -> tuple[list[list[int]], list[list[float]], list[int]]:
        """Host copies, for the engine's output step (the one place a sync is expected)."""
        return self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()


@dataclass(slots=True)
class SamplerOutput:
    # [B] int64
    sampled_token_ids: torch.Tensor
    # None when no row asked for logprobs; rows that asked for fewer than k are trimmed later
    logprobs: LogprobsTensors | None


class Sampler(torch.nn.Module):
    """Stateless: everything a step needs comes in the SamplingMetadata."""

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if meta.all_greedy and not (meta.min_tokens or meta.bad_words_token_ids or
                                    meta.repetition_penalties is not None or meta.max_num_logprobs is not None):
            # plain greedy: one kernel (fp32 conversion is exact, so argmax and its ties are the same)
            return SamplerOutput(sampled_token_ids=logits.argmax(dim=-1), logprobs=None)
        # [B, V] float32; a copy, so that the in-place steps below never touch the caller's logits
        work = logits.to(torch.float32, copy=True)
        apply_min_tokens(work, meta)
        apply_bad_words(work, meta)
        apply_penalties(work, meta)
        sampled = _sample(work, meta)  # [B] int64
        logprobs = None
        if meta.max_num_logprobs is not None:
            logprobs = compute_logprobs(logits, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)


def compute_logprobs(logits: torch.Tensor, chosen_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """Logprob and rank of each row's chosen token plus the row's top-k, from raw logits.

    logits: [N, V] any float dtype; chosen_ids: [N] integer. Used for sampled tokens (N = B) and
    for prompt logprobs (N = prompt positions, chosen = the next prompt token).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V] float32
    chosen = chosen_ids.to(torch.int64).unsqueeze(1)  # [N, 1]
    chosen_logprobs = logprobs.gather(1, chosen)  # [N, 1]
    # Competition ranking: 1 + the number of tokens strictly more likely than the chosen one.
    ranks = (logprobs > chosen_logprobs).sum(dim=-1) + 1  # [N] int64
    k = min(k, logprobs.shape[-1])
    if k == 0:
        return LogprobsTensors(token_ids=chosen, logprobs=chosen_logprobs, ranks=ranks)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [N, k] each
    return LogprobsTensors(
        token_ids=torch.cat([chosen, top_ids], dim=1),
        logprobs=torch.cat([chosen_logprobs, top_logprobs], dim=1),
        ranks=ranks,
    )


# ---------------------------------------------------------------------------------------------
# Logit processing (steps 1-3). Each edits logits [B, V] float32 in place.
# ---------------------------------------------------------------------------------------------


def apply_min_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Ban eos/stop ids for rows whose output is still shorter than their min_tokens."""
    rows: list[int] = []
    cols: list[int] = []
    for row, (min_tokens, banned_ids) in meta.min_tokens.items():
        if len(meta.output_token_lists[row]) < min_tokens:
            rows.extend([row] * len(banned_ids))
            cols.extend(banned_ids)
    _ban_tokens(logits, rows, cols)


def apply_bad_words(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Ban seq[-1] for every bad word seq whose prefix seq[:-1] ends the row's output."""
    rows: list[int] = []
    cols: list[int] = []
    for row, sequences in meta.bad_words_token_ids.items():
        output = meta.output_token_lists[row]
        for seq in sequences:
            if seq and _ends_with(output, seq[:-1]):
                rows.append(row)
                cols.append(seq[-1])
    _ban_tokens(logits, rows, cols)


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Repetition penalty (HF/vLLM) over prompt + output tokens; OpenAI presence and frequency
    penalties over output tokens only. A no-op when the batch has no penalty tensor."""
    repetition = meta.repetition_penalties
    presence = meta.presence_penalties
    frequency = meta.frequency_penalties
    if repetition is None and presence is None and frequency is None:
        return
    num_rows, vocab_size = logits.shape
    output_counts = _token_counts(meta.output_token_ids, num_rows, vocab_size, logits.device)
    if repetition is not None:
        seen = output_counts > 0  # [B, V] bool
        if meta.prompt_token_ids is not None:
            seen |= _token_counts(meta.prompt_token_ids, num_rows, vocab_size, logits.device) > 0
        penalty = repetition.to(torch.float32).unsqueeze(1)  # [B, 1]
        # Dividing a positive logit and multiplying a negative one both make the token less likely.
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # [B, V]
        logits.copy_(torch.where(seen, penalised, logits))
    if frequency is not None:
        logits -= frequency.to(torch.float32).unsqueeze(1) * output_counts
    if presence is not None:
        logits -= presence.to(torch.float32).unsqueeze(1) * (output_counts > 0)


def _token_counts(
    token_ids: torch.Tensor | None, num_rows: int, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[B, V] float32 occurrence count of each id in each row of token_ids [B, L].

    Pad ids (vocab_size, per the metadata contract) land in an extra column that is dropped;
    the clamp routes any larger pad there too.
    """
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=device)
    if token_ids is not None and token_ids.numel() > 0:
        index = token_ids.to(torch.int64).clamp(max=vocab_size)  # [B, L]
        counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def _ends_with(output: list[int], suffix: list[int]) -> bool:
    return len(output) >= len(suffix) and output[len(output) - len(suffix) :] == suffix


def _ban_tokens(logits: torch.Tensor, rows: list[int], cols: list[int]) -> None:
    """Set logits[rows[i], cols[i]] = -inf; ids outside the vocab are ignored."""
    vocab_size = logits.shape[-1]
    pairs = [(r, c) for r, c in zip(rows, cols) if 0 <= c < vocab_size]
    if not pairs:
        return
    # [2, n] int64: one small host-to-device copy, no device-to-host sync
    index = torch.tensor(pairs, dtype=torch.int64).T.to(logits.device, non_blocking=True)
    logits[index[0], index[1]] = float("-inf")


# ---------------------------------------------------------------------------------------------
# Sampling (steps 4-5).
# ---------------------------------------------------------------------------------------------


def _sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[B] int64 token ids from processed logits [B, V] float32 (edited in place)."""
    if meta.all_greedy:
        return logits.argmax(dim=-1)
    # greedy rows take the argmax of the same logits: min_p, top_k and top_p always keep a row's
    # maximum (and its lowest id among ties)
    filtered = meta.min_p is not None or meta.top_k is not None or meta.top_p is not None
    if filtered:
        apply_temperature(logits, meta.temperature)  # they act on the scaled distribution
    if meta.min_p is not None:
        apply_min_p(logits, meta.min_p)
    if meta.top_k is not None or meta.top_p is not None:
        apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    keys = row_keys(meta.seeds, logits.shape[0])
    temperature = meta.temperature.to(torch.float32)
    if filtered:
        # already scaled above: the race divides by 1 (greedy rows keep 0, i.e. plain argmax)
        temperature = torch.where(temperature < _SAMPLING_EPS, 0.0, 1.0)
    if logits.is_cuda:
        kernels = sampling_kernels()
        if kernels is not None:
            return kernels.gumbel_race(logits, keys.to(logits.device, non_blocking=True), temperature)
    return gumbel_race_reference(logits, keys, temperature)


def row_keys(seeds: dict[int, int], num_rows: int) -> torch.Tensor:
    """[num_rows] int64 on the host: the seeded rows' keys (in [0, 2**64), stored as the int64
    with the same bits), a fresh random key for every other row (torch's default generator, which
    the engine seeds at start)."""
    keys = torch.randint(-(2**63), 2**63 - 1, (num_rows,), dtype=torch.int64)
    if seeds:  # one scatter, not an indexing call per row (this runs every step)
        rows = torch.tensor(list(seeds), dtype=torch.int64)
        keys[rows] = torch.tensor([k - 2**64 if k >= 2**63 else k for k in seeds.values()], dtype=torch.int64)
    return keys


@functools.cache
def sampling_kernels():  # type: ignore[no-untyped-def]
    if not triton_elementwise_enabled():
        return None
    return load_elementwise_kernel("sampling")


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> None:
    """Divide each row by its temperature; greedy rows (0) divide by 1, their result is unused."""
    temperature = temperature.to(torch.float32)
    safe = torch.where(temperature < _SAMPLING_EPS, torch.ones_like(temperature), temperature)
    logits.div_(safe.unsqueeze(1))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = min_p.to(torch.float32).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [B, 1]
    logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> None:
    """Keep each row's top_k tokens, then the smallest prefix of those whose renormalised
    probability reaches top_p. One stable sort serves both; top_k = 0 and top_p = 1 are off.

    The stable descending sort puts the first of tied maxima first, so top_k = 1 keeps exactly
    the token that argmax picks.
    """
    vocab_size = logits.shape[-1]
    # [B, V] each: logits in descending order, and the vocab id at each sorted position
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab_size).unsqueeze(1)  # [B, 1]
        position = torch.arange(vocab_size, device=logits.device)  # [V]
        sorted_logits.masked_fill_(position >= k, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)  # [B, V]
        mass_before = probs.cumsum(dim=-1) - probs  # [B, V]; exactly 0 at position 0
        # A row with top_p = 1 keeps everything, even where rounding lets the cumsum reach 1 early.
        p = top_p.to(torch.float32)
        p = torch.where(p < 1.0, p, torch.full_like(p, float("inf"))).unsqueeze(1)  # [B, 1]
        sorted_logits.masked_fill_(mass_before >= p, float("-inf"))
    logits.scatter_(-1, order, sorted_logits)


def gumbel_race_reference(logits: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor,
                          rows_per_chunk: int = 32) -> torch.Tensor:
    """[B] int64: argmax_i l_i / t - log(-log(u_i)) with u = hashed_uniform(key, i); rows with
    t < 1e-5 take argmax_i l_i.

    That is the exponential race argmax_i p_i / q_i with q_i = -log(u_i) ~ Exp(1), in logs (log p_i
    is l_i / t less the row's normaliser): it picks i with probability p_i, and a row's draw depends
    on its key and logits only, whatever the batch. Chunks of rows bound the [rows, V] temporaries.
    """
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    keys, temperature = keys.to(logits.device), temperature.to(device=logits.device, dtype=torch.float32)
    greedy = temperature < _SAMPLING_EPS
    safe = torch.where(greedy, 1.0, temperature)
    for lo in range(0, logits.shape[0], rows_per_chunk):
        hi = min(lo + rows_per_chunk, logits.shape[0])
        rows = logits[lo:hi].float()
        noise = -torch.log(-torch.log(hashed_uniform(keys[lo:hi], logits.shape[1])))  # [rows, V] Gumbel
        scores = torch.where(greedy[lo:hi, None], rows, rows / safe[lo:hi, None] + noise)
        out[lo:hi] = scores.argmax(dim=-1)
    return out


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def hashed_uniform(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[S, vocab] float32 in (0, 1): splitmix64 of (key, token id), bit-identical on CPU and CUDA.

    int64 multiplication wraps modulo 2**64 in torch, which is exactly the arithmetic splitmix64
    needs; the top 24 bits make the float.
    """
    golden = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
    x = keys[:, None] + (torch.arange(1, vocab + 1, device=keys.device, dtype=torch.int64) * golden)[None, :]
    x = (x ^ _srl(x, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = (x ^ _srl(x, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    x = x ^ _srl(x, 31)
    return (_srl(x, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
