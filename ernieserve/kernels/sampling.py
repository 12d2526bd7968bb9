"""Random sampling in one pass over the logits: the Gumbel-max race with counter-hash noise.

`layers/sampler.py` samples by an exponential race, argmax_i p_i / q_i with q_i = -log(u_i), where
u_i is a splitmix64 hash of (row key, token id) (`hashed_uniform`). Taking logs, the same race is

    argmax_i  l_i - log(-log(u_i))        (l = temperature-scaled logits; Gumbel-max)

because log p_i differs from l_i by the row's log-normaliser only. That form needs no softmax and
no [B, V] temporaries: this kernel hashes each token id in registers, adds the noise and keeps a
running argmax, reading the logits once. It divides by each row's temperature itself (IEEE
division, as torch does), so a decode step can run it straight on the LM head's bf16 output,
inside the step's CUDA graph (worker/cuda_graph.py). Greedy rows (temperature below 1e-5) skip
the noise: plain argmax. Ties go to the lowest token id, as torch.argmax does.

On torch's path the race costs about 25 full passes over [B, V] tensors (int64 hashing, softmax,
log, division); at batch 256 and ERNIE's 103k vocabulary that is several GB of memory traffic per
step. Here it is one read of the logits.

Grid: (rows, vocab splits); each program reduces `chunk` ids to one (score, id) pair, and a tiny
torch argmax over the splits finishes (earlier splits win ties, so the lowest id does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # token ids per iteration of a program
SAMPLING_EPS = 1e-5  # a temperature below it means argmax (as SamplingParams.greedy)
_TARGET_PROGRAMS = 512  # enough to fill an H100 (132 SMs) at batch 1


@triton.jit
def _gumbel_race_kernel(
    logits_ptr, temperature_ptr, keys_ptr, best_val_ptr, best_idx_ptr,
    vocab, stride_row, num_splits, chunk,  # chunk: ids per program, a multiple of BLOCK (a runtime
    BLOCK: tl.constexpr, EPS: tl.constexpr,  # value: no compile per batch size)
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    key = tl.load(keys_ptr + row).to(tl.uint64, bitcast=True)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature < EPS
    start = split * chunk
    best_val = tl.full([], -float("inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32) + start
    for off in range(0, chunk, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        ok = cols < vocab
        logit = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=ok, other=-float("inf"))
        logit = logit.to(tl.float32)
        # splitmix64 of key + (id + 1) * golden, exactly as layers/sampler.py's hashed_uniform
        x = key + (cols + 1).to(tl.uint64) * 0x9E3779B97F4A7C15
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        x = x ^ (x >> 31)
        u = ((x >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # (0, 1), 24 bits
        # the IEEE quotient, as torch's division: the same scores as the torch path's
        scaled = tl.div_rn(logit, tl.where(greedy, 1.0, temperature))
        score = tl.where(greedy, logit, scaled - tl.log(-tl.log(u)))
        score = tl.where(ok, score, -float("inf"))
        m = tl.max(score, axis=0)
        i = tl.argmax(score, axis=0)  # the lowest id among equal maxima
        better = m > best_val  # strict: an earlier block keeps a tie
        best_idx = tl.where(better, start + off + i, best_idx)
        best_val = tl.where(better, m, best_val)
    tl.store(best_val_ptr + row * num_splits + split, best_val)
    tl.store(best_idx_ptr + row * num_splits + split, best_idx)


def gumbel_race(logits: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """[B] int64 sampled ids (written into `out` when given: CUDA graphs keep its address).

    logits: [B, V] float, banned ids at -inf, rows contiguous; keys: [B] int64, each row's hash key;
    temperature: [B] float32; rows below 1e-5 take the plain argmax, the others divide by theirs
    (pass 1.0 for logits already scaled).
    """
    assert logits.dim() == 2 and logits.stride(1) == 1
    rows, vocab = logits.shape
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    splits = max(1, min(triton.cdiv(vocab, BLOCK), triton.cdiv(_TARGET_PROGRAMS, rows)))
    chunk = triton.cdiv(triton.cdiv(vocab, splits), BLOCK) * BLOCK
    splits = triton.cdiv(vocab, chunk)
    best_val = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    _gumbel_race_kernel[(rows, splits)](
        logits, temperature, keys, best_val, best_idx,
        vocab, logits.stride(0), splits, chunk,
        BLOCK=BLOCK, EPS=SAMPLING_EPS, num_warps=4,
    )
    if splits == 1:
        out.copy_(best_idx[:, 0])
    else:
        out.copy_(best_idx.gather(1, best_val.argmax(dim=1, keepdim=True)).squeeze(1))
    return out
