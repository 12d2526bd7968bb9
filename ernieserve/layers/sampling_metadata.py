"""Per-step sampling inputs, built by the model runner's input batch from each request's params.

Every tensor has one row per request that samples this step (row order = batch order) and lives on
the logits' device. Optional fields are None when no request in the batch needs them, so the
sampler skips that work entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SamplingMetadata:
    # [B] float32; 0.0 marks a greedy row
    temperature: torch.Tensor
    all_greedy: bool
    all_random: bool
    # [B] float32 in (0, 1]; None when every row has top_p == 1
    top_p: torch.Tensor | None = None
    # [B] int64; 0 = off; None when every row is off
    top_k: torch.Tensor | None = None
    # [B] float32; None when every row has min_p == 0
    min_p: torch.Tensor | None = None
    # row -> 64-bit key of a seeded request at this step (its seed mixed with its output position):
    # the row's random draws are a pure function of the key, so they do not depend on the batch
    seeds: dict[int, int] = field(default_factory=dict)
    # Penalties: None when no row uses any penalty.
    # [B] float32 each
    repetition_penalties: torch.Tensor | None = None
    presence_penalties: torch.Tensor | None = None
    frequency_penalties: torch.Tensor | None = None
    # [B, max_prompt_len] int64, padded with vocab_size (an id that matches nothing)
    prompt_token_ids: torch.Tensor | None = None
    # [B, max_output_len] int64 generated so far, padded with vocab_size
    output_token_ids: torch.Tensor | None = None
    # row -> (min_tokens, ids to suppress): rows whose output is still shorter than min_tokens;
    # their eos and stop token ids get -inf
    min_tokens: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    # row -> banned token sequences; the last token of a sequence is banned when the output
    # already ends with the sequence's prefix
    bad_words_token_ids: dict[int, list[list[int]]] = field(default_factory=dict)
    # row -> tokens generated so far (host lists, used by min_tokens and bad_words checks only)
    output_token_lists: list[list[int]] = field(default_factory=list)
    # largest `logprobs` any row asked for; None when no row wants logprobs
    max_num_logprobs: int | None = None
