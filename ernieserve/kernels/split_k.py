"""Split-K kernels reduced in the same launch: the last program of each output tile adds the splits.

Used by the quantized GEMMs (kernels/quant_matmul.py, kernels/fp8_matmul.py) and the split-K
decode attention (kernels/paged_attention.py, which combines its splits by log-sum-exp).

A decode-shaped GEMM (a few rows) splits K over programs so that every SM streams weights. The
partial sums used to land in an fp32 ``[splits, M, N]`` buffer that torch reduced afterwards
(`sum(0)`, a bias add and a cast to the output dtype: three more launches per linear layer, which
at decode cost more than the reduction itself). Here each program writes its partial sum to that
workspace and takes a ticket from its tile's counter; the program holding the last ticket adds
the splits in the order 0..S-1 (the same every time, so results do not depend on scheduling), adds
the bias, stores the output in its dtype, and puts the counter back to zero for the next launch,
so CUDA graph replays find it clean.

The ticket is an acquire-release atomic, taken once per program (Triton runs a scalar atomic on
one thread and shares its result) after a barrier over the program's threads: the partial sums
written before it are visible to the program that takes the last one, which reads them past L1
(`.cg`).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs without triton
    HAS_TRITON = False

# One counter per output tile, per device, allocated once and never moved: captured graphs hold
# its address. Decode tiles are at most 2 x ceil(N / 32) of them.
MAX_TILES = 1 << 16
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def tile_counters(device: torch.device) -> torch.Tensor:
    """The device's zeroed tile counters (int32 [MAX_TILES])."""
    buf = _COUNTERS.get(device)
    if buf is None:
        buf = _COUNTERS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return buf


if HAS_TRITON:

    @triton.jit
    def store_tile(acc, out_ptr, bias_ptr, ws_ptr, counter_ptr, rm, rn, M, N, stride_om,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
        """The epilogue of a GEMM program: its fp32 `acc` [BLOCK_M, BLOCK_N] of rows rm, columns rn
        becomes the output (plus bias, in out's dtype). SPLIT (grid axis 2 = K splits): `acc` is a
        partial sum, written to the workspace [splits, M, N] fp32; the tile's last program adds them."""
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        if SPLIT:
            pid_k, num_splits = tl.program_id(2), tl.num_programs(2)
            part = rm.to(tl.int64)[:, None] * N + rn[None, :]
            tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + part, acc, mask=mask)
            tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            tl.debug_barrier()  # every thread's partial is written before one thread takes the ticket
            ticket = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
            if ticket == num_splits - 1:
                # four splits' loads in flight at a time, added in order: a load per loop step waits
                # out one L2 round trip each
                total = tl.zeros_like(acc)
                for s0 in range(0, num_splits, 4):
                    for i in tl.static_range(4):
                        live = (rm < M) & (tl.full(rm.shape, s0 + i, tl.int32) < num_splits)
                        total += tl.load(ws_ptr + (s0 + i) * M * N + part, mask=live[:, None] & (rn < N)[None, :],
                                         other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
                tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(counter_ptr + tile, 0)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
