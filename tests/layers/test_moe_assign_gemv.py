"""The per-assignment GEMV kernels of weight-only quantized experts (moe_gemv.assignment_path,
ERNIESERVE_MOE_ASSIGN_GEMV), through the Triton interpreter, against the plain-torch reference:

* wint8 and wint4 (per output channel), fp32 and bf16, K split into one to three power-of-two chunks,
  row tiles that do not divide H or I, one and several tokens;
* the folded shared experts (the last slots, whose programs run before the PDL wait) and the down
  kernel's early reads give the same result as without them;
* which layouts AUTO sends there: the per-assignment alignment only, per-channel wint8 / wint4
  only, and only with the switch on.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.interpreter import require_interpreter

triton = require_interpreter()  # before ernieserve.layers.moe: kernels pick interpreter vs GPU at decoration

from ernieserve.layers.moe import fused_moe as fm  # noqa: E402
from ernieserve.layers.moe import fused_moe_quant as fmq  # noqa: E402
from ernieserve.layers.moe import moe_gemv  # noqa: E402
from ernieserve.layers.moe.fused_moe_quant import ExpertScheme, QuantizedExperts, QuantMoEPath  # noqa: E402
from tests.layers.test_moe_quant import _close, make_weights, quantize_all  # noqa: E402

WINT = [ExpertScheme.WINT4, ExpertScheme.WINT8]


def _routing(num_tokens: int, num_experts: int, top_k: int, shared: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k - shared routed ids (distinct per token, below E - shared) then the shared experts
    E - shared.., with the weights ERNIE gives those (1.0)."""
    g = torch.Generator().manual_seed(seed)
    routed = top_k - shared
    ids = torch.stack([torch.randperm(num_experts - shared, generator=g)[:routed] for _ in range(num_tokens)])
    ids = torch.cat([ids, torch.arange(num_experts - shared, num_experts).repeat(num_tokens, 1)], dim=1)
    weights = torch.rand(num_tokens, routed, generator=g) + 0.1
    weights = torch.cat([weights / weights.sum(-1, keepdim=True), torch.ones(num_tokens, shared)], dim=1)
    return weights.float(), ids.to(torch.int32).contiguous()


@pytest.mark.parametrize("scheme", WINT, ids=lambda s: s.value)
@pytest.mark.parametrize("shape", [(1, 8, 4, 96, 48, 2, (8, 16)), (3, 6, 3, 112, 24, 1, (4, 32)),
                                   (2, 5, 3, 64, 48, 0, None)], ids=str)  # (T, E, K, H, I, shared, tiles)
def test_assignment_path_matches_reference(scheme: ExpertScheme, shape: tuple) -> None:
    """H 96 = 64 + 32, 112 = 64 + 32 + 16; I 48 = 32 + 16 (a partial gate/up tile at BLOCK_N 32), 24 =
    16 + 8; down tiles of 16 / 32 rows over H 96 / 112 (the last partial); default tiles once."""
    num_tokens, num_experts, top_k, hidden, inter, shared, tiles = shape
    experts = quantize_all(*make_weights(num_experts, hidden, inter, seed=hidden + inter), scheme, 0)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(3))
    weights, ids = _routing(num_tokens, num_experts, top_k, shared, seed=inter)
    out = moe_gemv.assignment_path(x, experts, weights, ids, shared_slots=shared, tiles=tiles)
    _close(out, fmq.fused_moe_quant_ref(x, experts, weights, ids))
    slots = moe_gemv.assignment_path(x, experts, weights, ids, sum_slots=False, shared_slots=shared, tiles=tiles)
    assert slots.shape == (num_tokens, top_k, hidden)
    assert torch.equal(slots.sum(dim=1), out)


@pytest.mark.parametrize("scheme", WINT, ids=lambda s: s.value)
def test_assignment_path_bf16(scheme: ExpertScheme) -> None:
    w13, w2 = make_weights(6, 96, 48, seed=5)
    experts = quantize_all(w13.bfloat16(), w2.bfloat16(), scheme, 0)
    x = torch.randn(1, 96).bfloat16()
    weights, ids = _routing(1, 6, 4, 2, seed=6)
    out = moe_gemv.assignment_path(x, experts, weights, ids, shared_slots=2)
    _close(out, fmq.fused_moe_quant_ref(x, experts, weights, ids))


class _Launches:
    """Records the PACKED and SHARED_COMPUTE constexprs of the gate/up kernel's launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((kwargs.get("PACKED"), kwargs.get("SHARED_COMPUTE")))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("shape", [(1, 8, 4, 96, 48, 2, (8, 16)), (3, 6, 3, 112, 24, 1, (4, 32)),
                                   (2, 5, 3, 64, 48, 0, None)], ids=str)  # (T, E, K, H, I, shared, tiles)
def test_packed_int4_products(monkeypatch: pytest.MonkeyPatch, shape: tuple) -> None:
    """int4 with bf16 x takes the packed layout by default (uint16 weight pairs, 64-bit words of x:
    quant_matmul.int4_dot4, whose interpreter form sums the same products in fp32) on the odd shapes
    above, and it gives the fp32 conversion's result; ERNIESERVE_MOE_ASSIGN_PACKED's switch off
    takes that one. The shared experts compute before the wait only without it."""
    num_tokens, num_experts, top_k, hidden, inter, shared, tiles = shape
    w13, w2 = make_weights(num_experts, hidden, inter, seed=hidden + inter)
    experts = quantize_all(w13.bfloat16(), w2.bfloat16(), ExpertScheme.WINT4, 0)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(3)).bfloat16()
    weights, ids = _routing(num_tokens, num_experts, top_k, shared, seed=inter)
    launches = _Launches(moe_gemv._gate_up_assign_kernel)
    monkeypatch.setattr(moe_gemv, "_gate_up_assign_kernel", launches)
    packed = moe_gemv.assignment_path(x, experts, weights, ids, shared_slots=shared, tiles=tiles)
    _close(packed, fmq.fused_moe_quant_ref(x, experts, weights, ids))
    monkeypatch.setattr(moe_gemv, "assign_packed", lambda: False)
    fp32 = moe_gemv.assignment_path(x, experts, weights, ids, shared_slots=shared, tiles=tiles)
    moe_gemv.assignment_path(x.float(), experts, weights, ids, shared_slots=shared, tiles=tiles)
    assert torch.allclose(packed.float(), fp32.float(), rtol=2e-2, atol=1e-2)  # bf16 outputs, summed apart
    compute = (False, True, True) if shared else (None,) * 3
    assert launches.seen == [(True, compute[0]), (False, compute[1]), (False, compute[2])]


@pytest.mark.parametrize("scheme", WINT, ids=lambda s: s.value)
def test_early_reads_and_shared_programs_keep_the_bits(monkeypatch: pytest.MonkeyPatch, scheme: ExpertScheme) -> None:
    """Only the order of loads (and of programs) changes with the shared experts' programs first
    (computing before the wait or after it: the other way round from the default) and the down
    kernel's early reads: the output's bits do not."""
    experts = quantize_all(*make_weights(8, 96, 48, seed=11), scheme, 0)
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(12)).bfloat16()
    weights, ids = _routing(2, 8, 4, 2, seed=13)
    on = moe_gemv.assignment_path(x, experts, weights, ids, shared_slots=2, tiles=(16, 32))
    on_by_default = moe_gemv.assign_shared_compute(scheme is ExpertScheme.WINT4)  # the packed products
    monkeypatch.setattr(moe_gemv, "assign_shared_compute", lambda packed: not on_by_default)
    load_only = moe_gemv.assignment_path(x, experts, weights, ids, shared_slots=2, tiles=(16, 32))
    monkeypatch.setattr(fm, "shared_early", lambda: False)
    monkeypatch.setattr(fm, "down_early", lambda: False)
    off = moe_gemv.assignment_path(x, experts, weights, ids, shared_slots=2, tiles=(16, 32))
    assert torch.equal(on, off) and torch.equal(on, load_only)


def test_auto_takes_it_for_the_per_assignment_layout_only(monkeypatch: pytest.MonkeyPatch) -> None:
    experts = quantize_all(*make_weights(8, 64, 32, seed=14), ExpertScheme.WINT4, 0)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(15))
    weights, ids = _routing(1, 8, 4, 1, seed=16)
    calls: list[str] = []
    monkeypatch.setattr(moe_gemv, "assignment_path", lambda *a, **k: calls.append("assign") or torch.zeros_like(x))
    static = fm.per_assignment_alignment(ids, 8, 16)
    monkeypatch.setattr(moe_gemv, "assign_gemv_enabled", lambda: False)
    fmq.fused_moe_quant_triton(x, experts, weights, ids, alignment=static, shared_slots=1)
    assert calls == []  # off: the fused kernels
    monkeypatch.setattr(moe_gemv, "assign_gemv_enabled", lambda: True)
    fmq.fused_moe_quant_triton(x, experts, weights, ids, alignment=static, shared_slots=1)
    assert calls == ["assign"]
    fmq.fused_moe_quant_triton(x, experts, weights, ids)  # no alignment given (the sorted layout): not here
    grouped = quantize_all(*make_weights(8, 64, 32, seed=14), ExpertScheme.WINT4, 32)
    fmq.fused_moe_quant_triton(x, grouped, weights, ids, alignment=static, shared_slots=1)
    assert calls == ["assign"]
    fmq.fused_moe_quant_triton(x, experts, weights, ids, path=QuantMoEPath.ASSIGN)
    assert calls == ["assign", "assign"]


def test_supported_and_tiles() -> None:
    meta = torch.device("meta")
    e4 = QuantizedExperts.empty(ExpertScheme.WINT4, 0, 64, 2560, 1536, meta)  # ERNIE-4.5-21B-A3B
    e8 = QuantizedExperts.empty(ExpertScheme.WINT8, 0, 64, 2560, 1536, meta)
    assert moe_gemv.assign_supported(e4) and moe_gemv.assign_supported(e8)
    # 8 KiB of stored weight a program (one warp): int4 gate/up 2 pairs of 1280-byte rows, down 8 of 768
    assert moe_gemv.assign_tiles(e4) == (2, 8)
    assert moe_gemv.assign_tiles(e8) == (1, 4)
    assert not moe_gemv.assign_supported(QuantizedExperts.empty(ExpertScheme.WINT4, 128, 64, 2560, 1536, meta))
    assert not moe_gemv.assign_supported(QuantizedExperts.empty(ExpertScheme.FP8, 0, 64, 2560, 1536, meta))
    assert not moe_gemv.assign_supported(QuantizedExperts.empty(ExpertScheme.WINT8, 0, 4, 1000, 1536, meta))
    # H 2564 = 2048 + 512 + 4: a chunk of 4 columns, under the 4-byte weight vectors
    assert not moe_gemv.assign_supported(QuantizedExperts.empty(ExpertScheme.WINT4, 0, 4, 2564, 1536, meta))
    with pytest.raises(ValueError, match="per-channel wint8 / wint4"):
        moe_gemv.assignment_path(torch.zeros(1, 64), QuantizedExperts.empty(ExpertScheme.WINT4, 32, 4, 64, 32),
                                 torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.int32))
