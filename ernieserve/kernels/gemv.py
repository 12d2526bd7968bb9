"""Dense GEMV for decode-sized batches: ``y = x @ W^T (+ bias)`` with x [M <= 8, K] and W [N, K] in
the model dtype (bf16 / fp16 / fp32).

Why not cuBLAS: at one token it picks tiles of 64 output rows without splitting K, so the
attention projections of ERNIE-4.5-21B-A3B (N 3584 and 2560) run on 56 and 40 of an H100's 132
SMs and reach about 65% of the copy rate (torch.profiler, `nvjet_sm90_tst_64x8_64x16`). A decode
GEMV is a weight stream: what matters is that every SM streams, with enough bytes in flight.

Kernel (`_gemv_kernel`): grid (M blocks, N tiles, K splits). Each program streams its
[BLOCK_N, k range] slice of W in [BLOCK_N, BLOCK_K] tiles, multiplies by the matching x columns in
fp32 registers and accumulates elementwise, reducing over K once at the end (no tensor cores: at
M <= 8 a dot would waste 15/16 of them and force a shared-memory round trip). With split K the
partial sums go to a workspace that each tile's last program adds in a fixed order, in the same
launch (kernels/split_k.py), so the output does not depend on scheduling. No host sync and no
allocation that depends on values: it captures in CUDA graphs.

The reference is ``torch.nn.functional.linear``; `GEMV_MAX_TOKENS` and `choose_gemv_tiles` decide
when and how (layers/linear.py calls `gemv` for CUDA inputs of at most that many rows).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ernieserve.kernels import split_k

try:
    import triton
    import triton.language as tl

    from ernieserve.kernels.split_k import store_tile

    HAS_TRITON = True
except ImportError:  # CPU-only installs use torch
    HAS_TRITON = False

# Rows (tokens) up to which layers/linear.py takes this kernel on CUDA. 0 turns it off
# (ERNIESERVE_DENSE_GEMV_MAX_TOKENS overrides, for benchmarks).
GEMV_MAX_TOKENS = 0


def gemv_max_tokens() -> int:
    return int(os.environ.get("ERNIESERVE_DENSE_GEMV_MAX_TOKENS", GEMV_MAX_TOKENS))


@dataclass(frozen=True, slots=True)
class GemvTiles:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_gemv_tiles(m: int, n: int, k: int, device: torch.device, programs_per_sm: int = 4) -> GemvTiles:
    """BLOCK_N 32 rows of W, BLOCK_K 256 columns a step (16 KiB of bf16 in flight per program), and
    K split until the grid has about `programs_per_sm` programs per SM."""
    bm = min(8, triton.next_power_of_2(max(1, m)))
    bn, bk = 32, 256 if bm <= 2 else 128
    tiles_mn = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 132
    split = max(1, min(16, programs_per_sm * sms // tiles_mn, triton.cdiv(k, 2 * bk)))
    return GemvTiles(bm, bn, bk, split, 4)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["M"])
    def _gemv_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
        M, N, K, k_per_split, stride_xm, stride_wn, stride_om,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr, ACC3: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None, None] * stride_xm  # [BLOCK_M, 1, 1]
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
        if ACC3:  # elementwise accumulation, one reduction over K at the end
            acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:  # more rows than the registers hold that way: reduce every step
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_begin = tl.program_id(2) * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < k_end
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
            x = tl.load(x_rows + kk[None, None, :], mask=m_ok[:, None, None] & k_ok[None, None, :], other=0.0)
            if ACC3:
                acc += x.to(tl.float32) * w.to(tl.float32)[None, :, :]
            else:
                acc += tl.sum(x.to(tl.float32) * w.to(tl.float32)[None, :, :], axis=2)
        if ACC3:
            acc = tl.sum(acc, axis=2)
        store_tile(acc, out_ptr, bias_ptr, ws_ptr, counter_ptr, rm, rn, M, N, stride_om,
                   HAS_BIAS, SPLIT)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         tiles: GemvTiles | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: F.linear(x, weight, bias) for a few rows of x."""
    assert HAS_TRITON, "triton is not installed"
    k = x.shape[-1]
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1, "weight must be [N, K] with contiguous rows"
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    t = tiles or choose_gemv_tiles(m, n, k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, t.split_k), t.block_k) * t.block_k
    split = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n), split)
    assert grid[0] * grid[1] <= split_k.MAX_TILES or split == 1
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    counters = split_k.tile_counters(x.device) if split > 1 else out
    _gemv_kernel[grid](
        x2, weight, bias if bias is not None else x2, out, ws, counters,
        m, n, k, k_per_split, x2.stride(0), weight.stride(0), n,
        HAS_BIAS=bias is not None, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, SPLIT=split > 1,
        # up to 64 fp32 accumulators per thread kept elementwise
        ACC3=t.block_m * t.block_n * t.block_k <= 64 * 32 * t.num_warps, num_warps=t.num_warps,
    )
    return out.view(*x.shape[:-1], n)
