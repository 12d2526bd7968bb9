"""Routed experts with quantized weights: the stored layout, quantization per expert projection,
the plain-torch reference and the fused Triton path.

Layout (`QuantizedExperts`). Each expert matrix has R rows (output channels) and K columns
(w13: R = 2I, K = H, gate rows then up rows, as the bf16 ``w13``; w2: R = H, K = I):

=============== ============================================ ===================================================
scheme          weight                                       scale (fp32; ``W ~= q * scale``)
=============== ============================================ ===================================================
wint8           int8 ``[E, R, K]``                           ``[E, R, G]``: G = 1 per output channel, or
                                                             ceil(K / group_size) (the last group may be partial)
wint4           uint8 ``[E, R, ceil(K / 2)]``, two per byte  as wint8
                (quant_matmul's packing: even k low nibble)
fp8             e4m3 ``[E, R, K]``                           ``[E, R, 1]``; activations: one scale per token
block_wise_fp8  e4m3 ``[E, R, K]``                           ``[E, RB, ceil(K / 128)]`` per 128 x 128 block;
                                                             activations: per token and 128 columns
=============== ============================================ ===================================================

Block-wise w13 blocks the gate and the up half separately (RB = 2 * ceil(I / 128), up blocks from
row ceil(I / 128)), so a block never straddles the two even when I is not a multiple of 128, and
each projection quantizes on its own the moment it streams in (`quantize_rows`, `store`).

Fused path (`fused_moe_quant_triton`): the bf16 path's align kernel, then two grouped GEMMs that
walk the same expert-aligned blocks (fused_moe.py's docstring) with the weight tile loaded in its
stored type and dequantized in the K loop: int8 / int4 converted to the activation dtype for the
tensor-core dot (exact: |q| <= 127); fp8 dotted as fp8 after the activations are quantized per
token (group) by fp8_matmul's kernel. Per-channel scales multiply the accumulator once in the
epilogue; group-wise (and fp8 block) scales multiply each K step's partial product (BLOCK_K
divides the group, so a step never straddles two). int4 loads the activation tile contiguously
and splits it in registers into its even and odd columns, the partners of the low and high nibbles,
so the packed bytes feed two dots as they lie; nibbles become values by bit tricks (`_int4_values`,
quant_matmul's `int4_values`: inline PTX over 4 packed bytes per 32-bit register on GPUs), not
int -> float converts. When BLOCK_K divides K (EVEN_K, every model shape) the weight loads have no
K mask, so each tile moves as 16-byte cp.async copies (a mask on k = 2j < K is one-byte loads),
and they take no `other` (a masked weight only meets a zero activation or an unstored output; a
non-zero `other` is a select that sends the tile through registers and back to shared memory).
The down GEMM can split K: its partial sums land in ``[splits, N, H]``
fp32 and are added together with the top-k combine, in a fixed order. No host sync, no
routing-dependent allocation: capturable in CUDA graphs.

One-token path (`QuantMoEPath.ASSIGN`, per-channel wint8 / wint4; `moe_gemv.assignment_path`): with
the one-block-per-assignment alignment (fused_moe.per_assignment_alignment) AUTO takes the
per-assignment GEMVs instead of the fused kernels (ERNIESERVE_MOE_ASSIGN_GEMV=0: not).

Prefill path (`QuantMoEPath.DEQUANT`, wint8 / wint4): the fused GEMMs dequantize each weight tile
once per BLOCK_M rows of its expert, which at thousands of tokens can cost more than the matmul
(measured: only for group-wise wint4, whose prefill tiles spill registers). From
`DEQUANT_MIN_TOKENS` tokens on, one Triton pass writes the touched experts' w13 in the activation
dtype into a scratch shared by every layer of the model (`DequantScratch`), fused_moe.py's bf16
gate/up GEMM reads it, the same scratch takes w2 for the down GEMM. No host sync either.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass

import torch

from ernieserve.kernels import fp8_matmul as f8
from ernieserve.kernels import quant_matmul as qm
from ernieserve.layers.moe import fused_moe as fm
from ernieserve.kernels.pdl import pdl_enabled, pdl_launch
from ernieserve.layers.moe.fused_moe import HAS_TRITON, GemmTile

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ernieserve.kernels.pdl import pdl_wait
    from ernieserve.kernels.quant_matmul import int4_values as _int4_values
    from ernieserve.layers.moe.fused_moe import _block_coords, _down_block

FP8_BLOCK = f8.SCALE_BLOCK  # 128


class ExpertScheme(enum.Enum):
    WINT8 = "wint8"
    WINT4 = "wint4"
    FP8 = "fp8"
    BLOCK_FP8 = "block_wise_fp8"

    @property
    def is_fp8(self) -> bool:
        return self in (ExpertScheme.FP8, ExpertScheme.BLOCK_FP8)


def _scale_rows(rows: int, scheme: ExpertScheme) -> int:
    return math.ceil(rows / FP8_BLOCK) if scheme is ExpertScheme.BLOCK_FP8 else rows


def _scale_cols(k: int, scheme: ExpertScheme, group_size: int) -> int:
    if scheme is ExpertScheme.BLOCK_FP8:
        return math.ceil(k / FP8_BLOCK)
    if scheme is ExpertScheme.FP8:
        return 1
    return qm.num_groups(k, group_size)


@dataclass(slots=True)
class QuantizedExperts:
    """One layer's quantized experts (this rank's); tensors as in the module docstring."""

    scheme: ExpertScheme
    group_size: int  # wint: K group of the scales, 0 = per output channel; fp8 schemes: 0
    hidden: int  # H
    inter: int  # I (this rank's)
    w13: torch.Tensor  # [E, 2I, H] or [E, 2I, ceil(H/2)]
    w13_scale: torch.Tensor
    w2: torch.Tensor  # [E, H, I] or [E, H, ceil(I/2)]
    w2_scale: torch.Tensor

    @classmethod
    def empty(cls, scheme: ExpertScheme, group_size: int, num_experts: int, hidden: int, inter: int,
              device: torch.device | None = None) -> QuantizedExperts:
        if scheme is ExpertScheme.WINT4:
            dtype, packed = torch.uint8, lambda k: (k + 1) // 2
        else:
            dtype, packed = (torch.int8 if scheme is ExpertScheme.WINT8 else f8.FP8_DTYPE), lambda k: k

        def weight(rows: int, k: int) -> torch.Tensor:
            return torch.empty(num_experts, rows, packed(k), dtype=dtype, device=device)

        def scale(rows: int, k: int) -> torch.Tensor:
            return torch.empty(num_experts, rows, _scale_cols(k, scheme, group_size), dtype=torch.float32,
                               device=device)

        up_rows = _scale_rows(inter, scheme)
        return cls(scheme, group_size, hidden, inter, weight(2 * inter, hidden), scale(2 * up_rows, hidden),
                   weight(hidden, inter), scale(_scale_rows(hidden, scheme), inter))

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def scale_group(self) -> int:
        """K columns per weight scale inside the kernels' K loop; 0: one scale per row (epilogue)."""
        return FP8_BLOCK if self.scheme is ExpertScheme.BLOCK_FP8 else self.group_size

    @property
    def up_scale_row(self) -> int:
        """First scale row of w13's up half."""
        return _scale_rows(self.inter, self.scheme)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w13_scale, self.w2, self.w2_scale))

    def store(self, expert: int, proj: str, q: torch.Tensor, scales: torch.Tensor) -> None:
        """Put one quantized projection (`quantize_rows` of gate/up [I, H] or down [H, I]) in its slot."""
        if proj == "down":
            self.w2[expert].copy_(q)
            self.w2_scale[expert].copy_(scales)
            return
        first = 0 if proj == "gate" else 1
        self.w13[expert].narrow(0, first * self.inter, self.inter).copy_(q)
        rows = self.up_scale_row
        self.w13_scale[expert].narrow(0, first * rows, rows).copy_(scales)

    def dequantize(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 fp32 [2I, H], w2 fp32 [H, I]) of one expert."""
        i, h, rows = self.inter, self.hidden, self.up_scale_row
        q13, s13 = self.w13[expert], self.w13_scale[expert]
        gate = _dequantize_rows(q13[:i], s13[:rows], self.scheme, self.group_size, h)
        up = _dequantize_rows(q13[i:], s13[rows:], self.scheme, self.group_size, h)
        down = _dequantize_rows(self.w2[expert], self.w2_scale[expert], self.scheme, self.group_size, i)
        return torch.cat([gate, up]), down


# ---- quantization and the reference (plain torch) ------------------------------------------------

def quantize_rows(w: torch.Tensor, scheme: ExpertScheme, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One projection [R, K] -> (q, scales) in the layout above (the linear methods' quantizers)."""
    if scheme is ExpertScheme.WINT8:
        return qm.quantize_int8(w, group_size)
    if scheme is ExpertScheme.WINT4:
        return qm.quantize_int4(w, group_size)
    if scheme is ExpertScheme.FP8:
        return f8.quantize_fp8_per_channel(w)
    return f8.quantize_fp8_blockwise(w)


def _dequantize_rows(q: torch.Tensor, scales: torch.Tensor, scheme: ExpertScheme, group_size: int,
                     k: int) -> torch.Tensor:
    if scheme is ExpertScheme.WINT8 or scheme is ExpertScheme.WINT4:
        return qm.dequantize_weight_only(q, scales, 8 if scheme is ExpertScheme.WINT8 else 4, k, group_size)
    block = FP8_BLOCK if scheme is ExpertScheme.BLOCK_FP8 else 1
    return f8.dequantize_fp8(q, scales, block, FP8_BLOCK if scheme is ExpertScheme.BLOCK_FP8 else k)


def _activation_group(scheme: ExpertScheme) -> int:
    return FP8_BLOCK if scheme is ExpertScheme.BLOCK_FP8 else 0


def _as_gemm_input(a: torch.Tensor, scheme: ExpertScheme) -> torch.Tensor:
    """Activations as the GEMM sees them, fp32: fp8 schemes quantize them per token (group)."""
    if not scheme.is_fp8:
        return a.float()
    group = _activation_group(scheme)
    q, s = f8.quant_fp8_per_token_group_ref(a, group)
    return f8.dequantize_fp8(q, s, 1, group or a.shape[1])


def fused_moe_quant_ref(
    x: torch.Tensor,  # [T, H]
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]; ids >= E (other ranks' experts) are skipped
) -> torch.Tensor:  # [T, H]
    """Dequantize each expert that received tokens and run it in fp32, rounding where the fused path
    does (the activation and each assignment's output in x's dtype). The CPU serving path."""
    num_experts, inter, top_k = experts.num_experts, experts.inter, topk_ids.shape[1]
    out = torch.zeros_like(x)
    flat_ids = topk_ids.reshape(-1).long()  # [T * K]
    flat_w = topk_weights.reshape(-1).float()
    order = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()[:num_experts]
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        idx = order[start:start + count]  # [count] assignment indices
        start += count
        tokens = idx // top_k
        w13, w2 = experts.dequantize(e)
        h = _as_gemm_input(x[tokens], experts.scheme) @ w13.t()  # [count, 2I] fp32
        act = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)
        y = _as_gemm_input(act, experts.scheme) @ w2.t() * flat_w[idx, None]  # [count, H]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


# ---- tiles ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class QuantMoETiles:
    block_m: int  # rows per expert block, shared by both GEMMs
    gate_up: GemmTile
    down: GemmTile
    down_split: int = 1  # K splits of the down GEMM (partials summed with the top-k combine)
    group_m: int = 8


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_quant_tiles(num_assignments: int, num_experts: int, experts: QuantizedExperts,
                       device: torch.device) -> QuantMoETiles:
    """Decode (few rows per expert) is a weight stream: BLOCK_K 256 so each 1-byte (int8, fp8) tile
    moves as many bytes as bf16's 128-deep one, and stages chosen so 2-3 programs fit an SM's shared
    memory (int8 gate/up: (16x256 bf16 + 2 x 256x32 int8) x 3 stages = 72 KiB; down 128x128 tiles
    x 4 stages = 80 KiB; int4 tiles are half the bytes). At one token (6 experts) the gate/up grid
    is 6 x 48 = 288 programs, about one wave; the down GEMM has 6 x 20 = 120 N tiles, so it splits
    K until about two programs per SM are busy. Prefill takes bf16's tiles (fp8: BLOCK_K 128, the
    same bytes as bf16's 64). BLOCK_K is capped by the scale group.

    TODO(lead, GPU): reasoned, not measured; `benchmarks/bench_moe_quant.py --sweep` tunes them.
    """
    base = fm.choose_tile_config(num_assignments, num_experts)
    rows = num_assignments / max(1, min(num_experts, num_assignments))
    group = experts.scale_group
    if rows <= 16 and experts.scheme is ExpertScheme.WINT4:
        # 128 packed bytes (one cache line) per weight row per K step. The dequantized B tile goes
        # through shared memory on its way to the dot (bf16 [256, BLOCK_N]: 16 KiB per 32 columns).
        # gate/up N32: the tile search on an H100 (2026-11-22 19:23, inline-PTX nibbles) measured
        # 33.7 vs N64's 36.6 us per 21B layer at one token, 108.8 vs 112.3 at 8 (with down K128 s4);
        # before that conversion N64 had won (248.9 vs 280.3 at 8 tokens).
        gate_up, down = GemmTile(32, 256, 4, 3), GemmTile(64, 256, 4, 3)
    elif rows <= 16:
        gate_up, down = GemmTile(32, 256, 4, 3), GemmTile(128, 128, 4, 4)
    else:
        bk = 128 if experts.scheme.is_fp8 else None  # fp8's bytes per element are half of bf16's
        gate_up = base.gate_up if bk is None else GemmTile(base.gate_up.block_n, bk, base.gate_up.num_warps,
                                                           base.gate_up.num_stages)
        down = base.down if bk is None else GemmTile(base.down.block_n, bk, base.down.num_warps,
                                                     base.down.num_stages)
    if group:
        gate_up, down = (GemmTile(t.block_n, min(t.block_k, group), t.num_warps, t.num_stages)
                         for t in (gate_up, down))
    split = 1
    if rows <= 16 and device.type == "cuda":
        programs = min(num_assignments, num_experts) * -(-experts.hidden // down.block_n)
        split = max(1, min(4, 2 * _num_sms(device.index or 0) // programs, -(-experts.inter // down.block_k)))
    return QuantMoETiles(base.block_m, gate_up, down, split, base.group_m)


# ---- which path: fused (decode) or dequantize-then-bf16 (prefill) ------------------------------------

class QuantMoEPath(enum.Enum):
    AUTO = "auto"  # by token count: `choose_path`
    FUSED = "fused"  # weight tiles dequantized in the K loop of each program (decode: a weight stream)
    DEQUANT = "dequant"  # touched experts dequantized once into a scratch, then the bf16 kernels
    ASSIGN = "assign"  # no dot, one GEMV per assignment, weight slices before the PDL wait (moe_gemv.py)


# Token counts from which AUTO takes the dequant path (None: never). The fused kernels dequantize a
# weight tile once per BLOCK_M rows of its expert, so their dequantization work grows with the
# tokens; the dequant path pays one fixed pass instead: read the int4 experts and write them in
# bf16, (0.38 + 1.5) GB / 3 TB/s ~ 0.63 ms at the 21B-A3B shape (all 64 experts touched: from a few
# hundred tokens on), then runs at bf16's matmul rate (1.49 ms at 4096 tokens, so ~1.4x bf16's
# time there and ~1.2x at 8192). Below the threshold the fixed pass costs more than the fused
# path's repeated dequantization. wint8 prefill runs its fused kernel at ~1.3x bf16 (measured),
# cheaper than the pass (0.5 GB read + 1.5 GB written): off. fp8's kernels run fp8 tensor-core
# dots, the dequant path does not handle them.
# Keyed by (scheme, grouped scales). Measured on an H100 (2026-11-22 19:20, 21B-A3B layer, all 64
# experts touched, `bench_moe_quant.py --path fused|dequant`, us): per-channel wint4 at 1024 / 4096 /
# 8192 tokens, fused 668 / 1934 / 3487 against dequant 1331 / 2115 / 3555, since the fused kernels
# convert nibbles with inline PTX -> never. Group-wise wint4's fused prefill tiles spill registers
# (8298 us at 4096): it keeps the dequant path from 1024 (reasoned, not measured at the crossover).
DEQUANT_MIN_TOKENS: dict[tuple[ExpertScheme, bool], int | None] = {
    (ExpertScheme.WINT4, False): None, (ExpertScheme.WINT4, True): 1024,
    (ExpertScheme.WINT8, False): None, (ExpertScheme.WINT8, True): None,
    (ExpertScheme.FP8, False): None, (ExpertScheme.BLOCK_FP8, True): None}


def choose_path(num_tokens: int, scheme: ExpertScheme, scratch: DequantScratch | None,
                grouped: bool = False) -> QuantMoEPath:
    """DEQUANT for prefill-sized batches of the schemes that have a threshold, when a scratch
    exists; else FUSED. (ASSIGN, at one token, is chosen from the alignment: fused_moe_quant_triton.)"""
    threshold = DEQUANT_MIN_TOKENS.get((scheme, grouped))
    if scratch is None or threshold is None or num_tokens < threshold:
        return QuantMoEPath.FUSED
    return QuantMoEPath.DEQUANT


@dataclass(slots=True)
class DequantScratch:
    """One buffer of dequantized expert weights shared by every quantized MoE layer of a model.

    Sized by the largest projection stack it has held (w13 of one layer: [E, 2I, H]); w2 reuses it
    after the gate/up GEMM has read w13 (same stream). Allocated at the first prefill that takes the
    dequant path, which in serving is the engine's memory-profiling step (a max_num_batched_tokens
    prefill, `ModelRunner._profile_peak`), so the KV cache sizing counts it; it is never freed.
    Graphs are captured after that step at decode sizes, which take the fused path (and if a capture
    size did reach the threshold, the buffer is already full-sized: nothing is allocated in capture).
    """

    buffer: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat [numel] tensor of `dtype` on `device` (grown, never shrunk)."""
        buf = self.buffer
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self.buffer = None  # let the allocator reuse the old memory for the new buffer
            buf = self.buffer = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()


# ---- Triton --------------------------------------------------------------------------------------

_KIND = {ExpertScheme.WINT8: 8, ExpertScheme.WINT4: 4, ExpertScheme.FP8: 1, ExpertScheme.BLOCK_FP8: 1}

if HAS_TRITON:

    @triton.jit
    def _load_a(a_rows, k0, K, row_ok, INT4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """One K step of the gathered activation rows, loaded contiguously: [BLOCK_M, BLOCK_K], or (int4
        weights) split in registers into its even and odd columns [BLOCK_M, BLOCK_K / 2] each, the
        partners of the low and high nibbles."""
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
        if INT4:
            a0, a1 = tl.split(tl.reshape(a, [BLOCK_M, BLOCK_K // 2, 2]))
        else:
            a0 = a
            a1 = a
        return a0, a1

    @triton.jit
    def _dot_q(a0, a1, w_cols, k0, K, n_ok, acc, KIND: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr = False,
               INLINE_ASM: tl.constexpr = False):
        """acc + A @ Q for one K step, Q the stored weight tile [BLOCK_K, BLOCK_N] (scales: caller).

        w_cols: [1, BLOCK_N] pointers to the first stored column of each weight row. EVEN_K: every
        step is whole (K % BLOCK_K == 0), so the weight load has no mask along K and vectorises (a
        mask on k = 2j < K varies from byte to byte: one-byte loads). INLINE_ASM: `int4_values`' PTX.
        """
        if KIND == 4:
            j = tl.arange(0, BLOCK_K // 2)
            if EVEN_K:
                w_ok = n_ok[None, :]
            else:
                w_ok = (k0 + 2 * j < K)[:, None] & n_ok[None, :]
            # [BLOCK_K / 2, BLOCK_N]; nibbles hold q + 8. No `other`: a masked byte (k >= K or a
            # column n >= N) only ever meets a zero activation or an output that is not stored, and
            # any nibble is a finite value; a non-zero `other` is a select after the pipelined
            # copy, which sends the tile through registers and back to shared memory.
            byte = tl.load(w_cols + (k0 // 2 + j)[:, None], mask=w_ok)
            if DOT_FP32:
                a0, a1 = a0.to(tl.float32), a1.to(tl.float32)
            low, high = _int4_values(byte, a0.dtype, INLINE_ASM)  # even k, odd k: [BLOCK_K / 2, BLOCK_N] each
            acc = tl.dot(a0, low, acc, input_precision=PRECISION)
            acc = tl.dot(a1, high, acc, input_precision=PRECISION)
        elif KIND == 8:
            kk = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                w_ok = n_ok[None, :]
            else:
                w_ok = (kk < K)[:, None] & n_ok[None, :]
            w = tl.load(w_cols + kk[:, None], mask=w_ok)  # no `other`: as int4's
            if DOT_FP32:
                a0 = a0.to(tl.float32)
            acc = tl.dot(a0, w.to(a0.dtype), acc, input_precision=PRECISION)
        else:  # fp8 x fp8 (the interpreter has no fp8 dot: upcast there)
            kk = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_cols + kk[:, None], mask=(kk < K)[:, None] & n_ok[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(a0.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a0, w, acc)
        return acc

    @triton.jit
    def _gate_up_quant_tile(
        a_ptr, as_ptr, w_ptr, ws_ptr, expert, ids, row_ok, offs_n, n_ok, H, I, up_scale_row,
        stride_at, stride_ast, stride_we, stride_wn, stride_wse, stride_wsn,
        TOP_K: tl.constexpr, KIND: tl.constexpr, SCALE_GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr,
        A_SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr, INLINE_ASM: tl.constexpr,
    ):
        """silu(gate) * up of one block's rows (assignments `ids`) and BLOCK_N columns, float32."""
        tokens = (ids // TOP_K).to(tl.int64)
        a_rows = a_ptr + tokens[:, None] * stride_at  # [BLOCK_M, 1]
        g_cols = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn  # [1, BLOCK_N]
        u_cols = g_cols + I * stride_wn  # up rows follow the gate rows
        s_base = ws_ptr + expert * stride_wse
        sg_ptrs = s_base + (offs_n // SCALE_ROWS) * stride_wsn  # [BLOCK_N]
        su_ptrs = s_base + (up_scale_row + offs_n // SCALE_ROWS) * stride_wsn
        as_ptrs = as_ptr + tokens * stride_ast  # [BLOCK_M] (fp8: activation scales)
        if SCALE_GROUP == 0:  # per output channel: loaded ahead of the K loop, used after it
            sg_out = tl.load(sg_ptrs, mask=n_ok, other=0.0)[None, :]
            su_out = tl.load(su_ptrs, mask=n_ok, other=0.0)[None, :]
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            a0, a1 = _load_a(a_rows, k0, H, row_ok, KIND == 4, BLOCK_M, BLOCK_K)
            if SCALE_GROUP > 0:  # this step's group: scale the partial product
                zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                part_g = _dot_q(a0, a1, g_cols, k0, H, n_ok, zero, KIND, BLOCK_K, DOT_FP32, PRECISION,
                               EVEN_K, INLINE_ASM)
                part_u = _dot_q(a0, a1, u_cols, k0, H, n_ok, zero, KIND, BLOCK_K, DOT_FP32, PRECISION,
                               EVEN_K, INLINE_ASM)
                kg = k0 // SCALE_GROUP
                sg = tl.load(sg_ptrs + kg, mask=n_ok, other=0.0)[None, :]
                su = tl.load(su_ptrs + kg, mask=n_ok, other=0.0)[None, :]
                if A_SCALED:
                    sa = tl.load(as_ptrs + kg, mask=row_ok, other=0.0)[:, None]
                    sg = sg * sa
                    su = su * sa
                acc_g += part_g * sg
                acc_u += part_u * su
            else:
                acc_g = _dot_q(a0, a1, g_cols, k0, H, n_ok, acc_g, KIND, BLOCK_K, DOT_FP32, PRECISION,
                               EVEN_K, INLINE_ASM)
                acc_u = _dot_q(a0, a1, u_cols, k0, H, n_ok, acc_u, KIND, BLOCK_K, DOT_FP32, PRECISION,
                               EVEN_K, INLINE_ASM)
        if SCALE_GROUP == 0:  # one scale per output channel (and per token for fp8)
            sg = sg_out
            su = su_out
            if A_SCALED:
                sa = tl.load(as_ptrs, mask=row_ok, other=0.0)[:, None]
                sg = sg * sa
                su = su * sa
            acc_g = acc_g * sg
            acc_u = acc_u * su
        return acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, float32

    # Counts that change from step to step are not specialised: Triton would otherwise compile
    # a variant for each of their classes (1, a multiple of 16, other) at first use, mid-serving.
    @triton.jit(do_not_specialize=["N", "num_pid_m"])
    def _gate_up_quant_kernel(
        a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr, total_ptr,
        N, H, I, num_pid_m, up_scale_row,
        stride_at, stride_ast, stride_we, stride_wn, stride_wse, stride_wsn,
        TOP_K: tl.constexpr, KIND: tl.constexpr, SCALE_GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr,
        A_SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr = False,
        INLINE_ASM: tl.constexpr = False, PDL: tl.constexpr = False,
        SHARED_SLOT0: tl.constexpr = 0, SHARED_EXPERT0: tl.constexpr = 0,
    ):
        """SHARED_SLOT0 > 0: the folded shared experts' blocks before the wait, as fused_moe's
        _gate_up_kernel (weight-only schemes: the activations are x itself, two launches back)."""
        pid_m, pid_n = _block_coords(num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        if SHARED_SLOT0 > 0:
            slot = pid_m % TOP_K
            if slot >= SHARED_SLOT0:  # a shared expert's block: all of it before the wait
                ids = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, N)
                row_ok = ids < N
                expert = (slot - SHARED_SLOT0 + SHARED_EXPERT0).to(tl.int64)
                act = _gate_up_quant_tile(
                    a_ptr, as_ptr, w_ptr, ws_ptr, expert, ids, row_ok, offs_n, n_ok, H, I, up_scale_row,
                    stride_at, stride_ast, stride_we, stride_wn, stride_wse, stride_wsn,
                    TOP_K, KIND, SCALE_GROUP, SCALE_ROWS, A_SCALED, BLOCK_M, BLOCK_N, BLOCK_K,
                    DOT_FP32, PRECISION, EVEN_K, INLINE_ASM)
                pdl_wait(PDL)  # the output may reuse memory an earlier kernel still touches: store after it
                out_ptrs = out_ptr + ids[:, None].to(tl.int64) * I + offs_n[None, :]
                tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
                return
        # before the align kernel's padded total, on every program (the spare ones too); the expert
        # (hence which weight tiles) is only known from block_expert after it
        pdl_wait(PDL)
        if pid_m * BLOCK_M >= tl.load(total_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        ids = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] assignments
        row_ok = ids < N
        act = _gate_up_quant_tile(
            a_ptr, as_ptr, w_ptr, ws_ptr, expert, ids, row_ok, offs_n, n_ok, H, I, up_scale_row,
            stride_at, stride_ast, stride_we, stride_wn, stride_wse, stride_wsn,
            TOP_K, KIND, SCALE_GROUP, SCALE_ROWS, A_SCALED, BLOCK_M, BLOCK_N, BLOCK_K,
            DOT_FP32, PRECISION, EVEN_K, INLINE_ASM)
        out_ptrs = out_ptr + ids[:, None].to(tl.int64) * I + offs_n[None, :]
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit(do_not_specialize=["N", "num_pid_m"])
    def _down_quant_kernel(
        a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, total_ptr,
        N, H, I, num_pid_m, k_per_split,
        stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_os,
        KIND: tl.constexpr, SCALE_GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr, A_SCALED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr = False,
        INLINE_ASM: tl.constexpr = False, PDL: tl.constexpr = False, EARLY: tl.constexpr = False,
    ):
        pid_m, pid_n = _block_coords(num_pid_m, tl.cdiv(H, BLOCK_N), GROUP_M)
        pid_k = tl.program_id(1)
        # the wait comes before the padded total's test, on every program (see _gate_up_quant_kernel);
        # EARLY: the block's routing is read before it (fused_moe._down_block)
        live, expert, ids, wt = _down_block(total_ptr, block_expert_ptr, sorted_ptr, weights_ptr, pid_m, N,
                                            BLOCK_M, PDL, EARLY)
        if not live:
            return
        row_ok = ids < N
        rows = ids.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H
        a_rows = a_ptr + rows[:, None] * stride_am  # rows of inter [N, I], assignment order
        w_cols = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
        s_ptrs = ws_ptr + expert * stride_wse + (offs_n // SCALE_ROWS) * stride_wsn
        if SCALE_GROUP == 0:  # per output channel: static, loaded ahead of the K loop
            s_out = tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
        as_ptrs = as_ptr + rows * stride_asm
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, I)
        for k0 in range(k_begin, k_end, BLOCK_K):
            a0, a1 = _load_a(a_rows, k0, I, row_ok, KIND == 4, BLOCK_M, BLOCK_K)
            if SCALE_GROUP > 0:
                zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                part = _dot_q(a0, a1, w_cols, k0, I, n_ok, zero, KIND, BLOCK_K, DOT_FP32, PRECISION,
                               EVEN_K, INLINE_ASM)
                kg = k0 // SCALE_GROUP
                s = tl.load(s_ptrs + kg, mask=n_ok, other=0.0)[None, :]
                if A_SCALED:
                    s = s * tl.load(as_ptrs + kg, mask=row_ok, other=0.0)[:, None]
                acc += part * s
            else:
                acc = _dot_q(a0, a1, w_cols, k0, I, n_ok, acc, KIND, BLOCK_K, DOT_FP32, PRECISION,
                               EVEN_K, INLINE_ASM)
        if SCALE_GROUP == 0:
            s = s_out
            if A_SCALED:
                s = s * tl.load(as_ptrs, mask=row_ok, other=0.0)[:, None]
            acc = acc * s
        acc *= wt[:, None]  # routing weight
        out_ptrs = out_ptr + pid_k * stride_os + rows[:, None] * H + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _quantize_activations(a: torch.Tensor, scheme: ExpertScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 schemes: (e4m3 [M, K], fp32 scales [M, groups]). The interpreter (CPU tensors) casts
    fp32 -> e4m3 wrongly when rounding carries into the exponent (tests/layers/test_quantization.py),
    so off the GPU the same quantization runs in plain torch."""
    group = _activation_group(scheme)
    if a.is_cuda:
        return f8.quant_fp8_per_token_group(a, group)
    return f8.quant_fp8_per_token_group_ref(a, group)


def fused_moe_quant_triton(
    x: torch.Tensor,  # [T, H]
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]
    tiles: QuantMoETiles | None = None,
    foreign_experts: bool = False,
    scratch: DequantScratch | None = None,
    path: QuantMoEPath = QuantMoEPath.AUTO,
    sum_slots: bool = True,
    alignment: fm.Alignment | None = None,
    shared_slots: int = 0,
) -> torch.Tensor:  # [T, H]
    """The routed experts on quantized weights, by the path `choose_path` picks (or `path`: FUSED,
    DEQUANT, or ASSIGN, moe_gemv's per-assignment GEMVs for per-channel wint8 / wint4, which AUTO
    takes for the one-block-per-assignment alignment).

    foreign_experts: some ids equal E (another rank's experts, expert parallelism); the align
    kernel leaves them out and their rows of the per-assignment output stay zero.
    scratch: the model's shared buffer for the dequant path (AUTO never takes that path without
    one; a forced DEQUANT without one allocates a temporary buffer).
    sum_slots=False: the per-slot outputs [T, K, H] unsummed where a path has them in the model
    dtype (fused_moe.combine_slots); paths whose down GEMM splits K still return the sum [T, H].
    alignment: moe_align's outputs for topk_ids already made (fused_moe.triton_route_align, or
    fused_moe.per_assignment_alignment) for the FUSED and DEQUANT paths' block_m
    (choose_tile_config's); ASSIGN needs none.
    shared_slots: the last columns of topk_ids that are folded shared experts (fused_moe_triton's).
    """
    assert HAS_TRITON, "triton is not installed"
    if path is QuantMoEPath.AUTO and alignment is not None and alignment.per_assignment and not foreign_experts:
        from ernieserve.layers.moe import moe_gemv  # it imports this module's kernels and types

        if moe_gemv.assign_gemv_enabled() and moe_gemv.assign_supported(experts):
            path = QuantMoEPath.ASSIGN
    if path is QuantMoEPath.AUTO:
        path = choose_path(x.shape[0], experts.scheme, scratch, grouped=experts.scale_group > 0)
    if path is QuantMoEPath.ASSIGN:
        from ernieserve.layers.moe import moe_gemv

        return moe_gemv.assignment_path(x, experts, topk_weights, topk_ids, sum_slots, shared_slots)
    if path is QuantMoEPath.DEQUANT:
        scratch = scratch if scratch is not None else DequantScratch()
        return _dequant_path(x, experts, topk_weights, topk_ids, scratch, tiles, foreign_experts, sum_slots,
                             alignment)
    return _fused_path(x, experts, topk_weights, topk_ids, tiles, foreign_experts, sum_slots, alignment,
                       shared_slots)


def _fused_path(
    x: torch.Tensor,  # [T, H]
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]
    tiles: QuantMoETiles | None,
    foreign_experts: bool,
    sum_slots: bool = True,
    alignment: fm.Alignment | None = None,
    shared_slots: int = 0,
) -> torch.Tensor:  # [T, H]
    """Weight tiles dequantized inside the grouped GEMMs: no scratch, graph-capturable."""
    num_tokens, hidden = x.shape
    num_experts, inter, top_k = experts.num_experts, experts.inter, topk_ids.shape[1]
    n = num_tokens * top_k
    if n == 0:
        return torch.zeros_like(x)
    assert hidden == experts.hidden, f"x has {hidden} features, the experts {experts.hidden}"
    x = x.contiguous()
    t = tiles or choose_quant_tiles(n, num_experts, experts, x.device)
    group = experts.scale_group
    if group:
        assert group % t.gate_up.block_k == 0 and group % t.down.block_k == 0, "BLOCK_K must divide the scale group"
    sorted_ids, block_expert, total = fm.checked_alignment(alignment, topk_ids, num_experts, t.block_m)
    num_pid_m = block_expert.shape[0]
    scheme = experts.scheme
    fp8 = scheme.is_fp8
    # The interpreter multiplies bf16 dot operands as raw bits and has no fp8 dot: fp32 there.
    dot_fp32 = x.device.type == "cpu" and (x.dtype != torch.float32 or fp8)
    precision = "ieee" if x.dtype == torch.float32 or dot_fp32 else "tf32"
    inline_asm = x.is_cuda  # compiled code (the interpreter cannot run inline PTX)
    kind = _KIND[scheme]
    scale_rows = FP8_BLOCK if scheme is ExpertScheme.BLOCK_FP8 else 1
    pdl = pdl_launch(pdl_enabled(x.device))

    early = {}  # the folded shared experts' blocks before the wait: x is the activation (not fp8)
    if shared_slots and not fp8 and alignment is not None and alignment.per_assignment and fm.shared_early():
        early = {"SHARED_SLOT0": top_k - shared_slots, "SHARED_EXPERT0": num_experts - shared_slots}
    a, a_scale = _quantize_activations(x, scheme) if fp8 else (x, x)  # x: an unread placeholder
    act = torch.empty(n, inter, dtype=x.dtype, device=x.device)  # [N, I], assignment order
    w13, s13 = experts.w13, experts.w13_scale
    g = t.gate_up
    _gate_up_quant_kernel[(num_pid_m * triton.cdiv(inter, g.block_n),)](
        a, a_scale, w13, s13, act, sorted_ids, block_expert, total,
        n, hidden, inter, num_pid_m, experts.up_scale_row,
        a.stride(0), a_scale.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
        TOP_K=top_k, KIND=kind, SCALE_GROUP=group, SCALE_ROWS=scale_rows, A_SCALED=fp8,
        BLOCK_M=t.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, GROUP_M=t.group_m,
        DOT_FP32=dot_fp32, PRECISION=precision, EVEN_K=hidden % g.block_k == 0, INLINE_ASM=inline_asm,
        num_warps=g.num_warps, num_stages=g.num_stages, **early, **pdl)

    a2, a2_scale = _quantize_activations(act, scheme) if fp8 else (act, act)
    d = t.down
    k_per_split = triton.cdiv(triton.cdiv(inter, t.down_split), d.block_k) * d.block_k
    split = triton.cdiv(inter, k_per_split)
    alloc = torch.zeros if foreign_experts else torch.empty  # foreign rows are never written
    if split == 1:
        per_slot = alloc(n, hidden, dtype=x.dtype, device=x.device)  # [N, H], weighted
    else:
        per_slot = alloc(split, n, hidden, dtype=torch.float32, device=x.device)  # partial sums over K
    w2, s2 = experts.w2, experts.w2_scale
    _down_quant_kernel[(num_pid_m * triton.cdiv(hidden, d.block_n), split)](
        a2, a2_scale, w2, s2, per_slot, topk_weights.float().contiguous(), sorted_ids, block_expert, total,
        n, hidden, inter, num_pid_m, k_per_split,
        a2.stride(0), a2_scale.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), n * hidden,
        KIND=kind, SCALE_GROUP=group, SCALE_ROWS=scale_rows, A_SCALED=fp8,
        BLOCK_M=t.block_m, BLOCK_N=d.block_n, BLOCK_K=d.block_k, GROUP_M=t.group_m,
        DOT_FP32=dot_fp32, PRECISION=precision, EVEN_K=inter % d.block_k == 0, INLINE_ASM=inline_asm,
        num_warps=d.num_warps, num_stages=d.num_stages, EARLY=fm.down_early(), **pdl)
    if split == 1:
        return fm.combine_slots(per_slot, num_tokens, top_k, sum_slots)
    # K splits and top-k slots in one fixed-order reduction
    return per_slot.view(split, num_tokens, top_k, hidden).sum(dim=(0, 2)).to(x.dtype)


# ---- the prefill path: dequantize once, then the bf16 grouped GEMMs --------------------------------

def dequantize_experts_into(out: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                            experts: QuantizedExperts, touched: torch.Tensor) -> None:
    """One Triton pass: out [E, R, K] (x's dtype) = the weight-only projections [E, R, K(/2)] times
    their scales [E, R, G], for the experts with touched[e] != 0 (touched: int32 [E + 1]; the
    others' rows of out are left as they were)."""
    assert experts.scheme in (ExpertScheme.WINT4, ExpertScheme.WINT8), experts.scheme
    qm.dequantize_into(out, qweight, scale, _KIND[experts.scheme], experts.group_size, touched)


def _dequant_path(
    x: torch.Tensor,  # [T, H]
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]
    scratch: DequantScratch,
    tiles: QuantMoETiles | None,
    foreign_experts: bool,
    sum_slots: bool = True,
    alignment: fm.Alignment | None = None,
) -> torch.Tensor:  # [T, H]
    """Dequantize w13 of the touched experts into the scratch, run fused_moe.py's gate/up GEMM,
    dequantize w2 into the same scratch, run its down GEMM, combine. No host sync."""
    if experts.scheme.is_fp8:
        raise ValueError(f"the dequant path takes weight-only schemes (wint8, wint4), not {experts.scheme.value}")
    num_tokens, hidden = x.shape
    num_experts, inter, top_k = experts.num_experts, experts.inter, topk_ids.shape[1]
    n = num_tokens * top_k
    if n == 0:
        return torch.zeros_like(x)
    assert hidden == experts.hidden, f"x has {hidden} features, the experts {experts.hidden}"
    x = x.contiguous()
    topk_ids = topk_ids.contiguous()
    t = fm.choose_tile_config(n, num_experts) if tiles is None else \
        fm.MoETileConfig(tiles.block_m, tiles.gate_up, tiles.down, tiles.group_m)
    sorted_ids, block_expert, total = fm.checked_alignment(alignment, topk_ids, num_experts, t.block_m)
    num_pid_m = block_expert.shape[0]
    # experts with at least one assignment; slot E collects other ranks' experts (ignored)
    touched = torch.zeros(num_experts + 1, dtype=torch.int32, device=x.device)
    touched.index_fill_(0, topk_ids.reshape(-1).long(), 1)
    buf = scratch.get(num_experts * max(2 * inter * hidden, hidden * inter), x.dtype, x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    dot_fp32 = x.device.type == "cpu" and x.dtype == torch.bfloat16  # the interpreter's bf16 dot

    w13 = buf[:num_experts * 2 * inter * hidden].view(num_experts, 2 * inter, hidden)
    dequantize_experts_into(w13, experts.w13, experts.w13_scale, experts, touched)
    act = torch.empty(n, inter, dtype=x.dtype, device=x.device)  # [N, I], assignment order
    g = t.gate_up
    fm._gate_up_kernel[(num_pid_m * triton.cdiv(inter, g.block_n),)](
        x, w13, act, sorted_ids, block_expert, total, n, hidden, inter, num_pid_m,
        x.stride(0), w13.stride(0), w13.stride(1),
        TOP_K=top_k, BLOCK_M=t.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, GROUP_M=t.group_m,
        DOT_PRECISION=precision, DOT_FP32=dot_fp32, num_warps=g.num_warps, num_stages=g.num_stages)

    w2 = buf[:num_experts * hidden * inter].view(num_experts, hidden, inter)  # after w13 is read
    dequantize_experts_into(w2, experts.w2, experts.w2_scale, experts, touched)
    alloc = torch.zeros if foreign_experts else torch.empty  # foreign rows are never written
    per_slot = alloc(n, hidden, dtype=x.dtype, device=x.device)  # [N, H], weighted
    d = t.down
    fm._down_kernel[(num_pid_m * triton.cdiv(hidden, d.block_n),)](
        act, w2, per_slot, topk_weights.float().contiguous(), sorted_ids, block_expert, total,
        n, hidden, inter, num_pid_m, w2.stride(0), w2.stride(1),
        BLOCK_M=t.block_m, BLOCK_N=d.block_n, BLOCK_K=d.block_k, GROUP_M=t.group_m,
        DOT_PRECISION=precision, DOT_FP32=dot_fp32, num_warps=d.num_warps, num_stages=d.num_stages)
    return fm.combine_slots(per_slot, num_tokens, top_k, sum_slots)
