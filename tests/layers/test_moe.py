"""MoE layer tests: routers against HF's router modules and a per-token computation, the torch
expert reference against HF's expert loop, the fused Triton path (through the interpreter, at tiny
shapes) against the reference, and streaming per-expert weights into the stacked parameters.
"""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides interpreter vs GPU code when a kernel is decorated, so the flag must be set before
# ernieserve.layers.moe (which defines the kernels) is first imported. Off-GPU only the
# interpreter can run them, so setting it process-wide is harmless there.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from ernieserve.distributed.parallel_state import TPGroup  # noqa: E402
from ernieserve.layers.moe import FusedMoE, RouterConfig, TopKRouter, select_experts  # noqa: E402
from ernieserve.layers.moe import fused_moe as fm  # noqa: E402

try:
    import triton

    _INTERPRETED = "Interpreted" in type(fm._gate_up_kernel).__name__
except ImportError:
    triton = None
    _INTERPRETED = False

needs_interpreter = pytest.mark.skipif(
    triton is None or not _INTERPRETED,
    reason="needs triton with TRITON_INTERPRET=1 set before ernieserve.layers.moe was imported")


def ernie_cfg(num_experts: int = 8, top_k: int = 2, norm_min: float = 1e-12) -> RouterConfig:
    return RouterConfig(num_experts, top_k, renormalize=True, norm_min=norm_min, logits_fp32=True, has_score_bias=True)


def qwen_cfg(num_experts: int = 8, top_k: int = 2, renormalize: bool = True) -> RouterConfig:
    return RouterConfig(num_experts, top_k, renormalize=renormalize, norm_min=0.0, logits_fp32=False,
                        has_score_bias=False)


# ---------------------------------------------------------------------------------------- routers

def _route_one_token(logits: list[float], bias: list[float], k: int, renorm: bool, norm_min: float):
    """Direct per-token routing: softmax, pick k largest of prob + bias, weight = prob."""
    t = torch.tensor(logits, dtype=torch.float64)
    probs = (t - t.max()).exp()
    probs = probs / probs.sum()
    scores = [float(p) + b for p, b in zip(probs, bias)]
    chosen = sorted(range(len(scores)), key=lambda e: -scores[e])[:k]
    weights = [float(probs[e]) for e in chosen]
    if renorm:
        s = max(sum(weights), norm_min)
        weights = [w / s for w in weights]
    return chosen, weights


@pytest.mark.parametrize("cfg,with_bias", [(ernie_cfg(), True), (ernie_cfg(), False), (ernie_cfg(norm_min=5.0), True),
                                           (qwen_cfg(), False), (qwen_cfg(renormalize=False), False)])
def test_select_experts_matches_direct_computation(cfg: RouterConfig, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(11, cfg.num_experts, generator=g)
    bias = torch.randn(cfg.num_experts, generator=g) * 0.2 if with_bias else None
    weights, ids = select_experts(logits, cfg, bias)
    for t in range(logits.shape[0]):
        b = bias.tolist() if bias is not None else [0.0] * cfg.num_experts
        chosen, expect = _route_one_token(logits[t].tolist(), b, cfg.top_k, cfg.renormalize, cfg.norm_min)
        assert ids[t].tolist() == chosen
        torch.testing.assert_close(weights[t].double(), torch.tensor(expect, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def test_score_bias_only_chooses_experts() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])  # forces expert 3 in, its weight stays its probability
    weights, ids = select_experts(logits, ernie_cfg(4, 2), bias)
    probs = torch.softmax(logits, -1)[0]
    assert ids[0].tolist() == [3, 0]
    torch.testing.assert_close(weights[0], torch.stack([probs[3], probs[0]]) / (probs[3] + probs[0]))


def test_routers_match_hf_modules() -> None:
    from transformers import Ernie4_5_MoeConfig, Qwen3MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    x = torch.randn(17, 32)
    hf_cfg = Ernie4_5_MoeConfig(hidden_size=32, moe_num_experts=8, moe_k=3, moe_norm_min=1e-12)
    hf = Ernie4_5_MoeTopKRouter(hf_cfg)
    torch.nn.init.normal_(hf.weight)
    hf.moe_statics.e_score_correction_bias.data.normal_(0, 0.1)
    ours = TopKRouter(32, ernie_cfg(8, 3), torch.float32)
    ours.weight.data.copy_(hf.weight)
    ours.load_score_bias(hf.moe_statics.e_score_correction_bias.data)
    _, hf_w, hf_ids = hf(x)
    w, ids = ours(x)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(w, hf_w)

    q_cfg = Qwen3MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    hq = Qwen3MoeTopKRouter(q_cfg)
    torch.nn.init.normal_(hq.weight)
    ours_q = TopKRouter(32, qwen_cfg(8, 2), torch.float32)
    ours_q.weight.data.copy_(hq.weight)
    _, hq_w, hq_ids = hq(x)
    w, ids = ours_q(x)
    assert torch.equal(ids, hq_ids)
    torch.testing.assert_close(w, hq_w)


@needs_interpreter
@pytest.mark.parametrize("cfg,with_bias,num_tokens", [(ernie_cfg(8, 2), True, 9), (ernie_cfg(64, 6), True, 3),
                                                      (qwen_cfg(6, 3), False, 5), (qwen_cfg(8, 2, False), False, 1)])
def test_triton_router_matches_reference(cfg: RouterConfig, with_bias: bool, num_tokens: int) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(num_tokens, cfg.num_experts, generator=g)
    bias = torch.randn(cfg.num_experts, generator=g) * 0.1 if with_bias else None
    ref_w, ref_ids = select_experts(logits, cfg, bias)
    w, ids = fm.triton_select_experts(logits, cfg, bias)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ expert reference

def make_experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    return w13, w2


def make_routing(num_tokens: int, num_experts: int, top_k: int, seed: int = 0, only: list[int] | None = None):
    """Random distinct experts per token (or always the experts in `only`) and positive weights."""
    g = torch.Generator().manual_seed(seed)
    if only is not None:
        ids = torch.tensor(only).repeat(num_tokens, 1)
    else:
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g) + 0.1
    return weights / weights.sum(-1, keepdim=True), ids


def test_reference_matches_hf_expert_loop() -> None:
    from transformers import Ernie4_5_MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeExperts

    cfg = Ernie4_5_MoeConfig(hidden_size=24, moe_intermediate_size=20, moe_num_experts=6, moe_k=2)
    hf = Ernie4_5_MoeExperts(cfg)
    w13, w2 = make_experts(6, 24, 20)
    hf.gate_up_proj.data.copy_(w13)
    hf.down_proj.data.copy_(w2)
    x = torch.randn(13, 24)
    weights, ids = make_routing(13, 6, 2)
    torch.testing.assert_close(fm.fused_moe_ref(x, w13, w2, weights, ids), hf(x, ids, weights), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ fused Triton path

def _check_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    sorted_ids, block_expert, total = fm.moe_align(topk_ids.int(), num_experts, block_m)
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    total = int(total)
    counts = torch.bincount(flat, minlength=num_experts)
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert total <= sorted_ids.numel()
    seen = sorted_ids[:total]
    real = seen[seen < n]
    assert sorted(real.tolist()) == list(range(n))  # every assignment exactly once
    assert bool((seen[seen >= n] == n).all())  # padding marked with N
    for b in range(total // block_m):
        rows = seen[b * block_m:(b + 1) * block_m]
        rows = rows[rows < n].long()
        assert bool((flat[rows] == block_expert[b]).all())


@needs_interpreter
def test_moe_align_layout() -> None:
    _check_align(make_routing(37, 8, 2)[1], 8, 16)
    _check_align(make_routing(5, 64, 6)[1], 64, 16)  # most experts get no token
    _check_align(make_routing(40, 8, 2, only=[3, 5])[1], 8, 16)  # everything on two experts, several blocks each
    _check_align(make_routing(1, 8, 1)[1], 8, 32)


FUSED_CASES = [
    # tokens, experts, top_k, hidden, inter, only, tiles
    (1, 8, 2, 32, 48, None, None),  # decode: one token, six experts idle
    (7, 8, 2, 40, 24, None, None),  # hidden/inter not multiples of the tiles
    (37, 8, 2, 32, 48, None, (16, 16, 16)),  # several blocks per expert, several n/k tiles
    (33, 4, 1, 32, 32, [2], (16, 16, 16)),  # all tokens to one expert: three blocks, the rest empty
    (20, 6, 3, 32, 16, None, (32, 16, 32)),
]


@needs_interpreter
@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter,only,tiles", FUSED_CASES)
def test_fused_matches_reference(num_tokens, num_experts, top_k, hidden, inter, only, tiles) -> None:
    w13, w2 = make_experts(num_experts, hidden, inter, seed=num_tokens)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(7))
    weights, ids = make_routing(num_tokens, num_experts, top_k, seed=3, only=only)
    tile_cfg = None
    if tiles is not None:
        bm, bn, bk = tiles
        tile_cfg = fm.MoETileConfig(bm, fm.GemmTile(bn, bk, 4, 1), fm.GemmTile(bn, bk, 4, 1))
    ref = fm.fused_moe_ref(x, w13, w2, weights, ids)
    out = fm.fused_moe_triton(x, w13, w2, weights, ids.int(), tile_cfg)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_fused_returns_unsummed_slots_on_request() -> None:
    """sum_slots=False gives the weighted per-slot outputs [T, K, H], whose sum is the usual output
    (the next RMSNorm adds them: kernels/fused_norm.py)."""
    w13, w2 = make_experts(8, 32, 48, torch.bfloat16)
    x = torch.randn(6, 32).to(torch.bfloat16)
    weights, ids = make_routing(6, 8, 3)
    summed = fm.fused_moe_triton(x, w13, w2, weights, ids)
    slots = fm.fused_moe_triton(x, w13, w2, weights, ids, sum_slots=False)
    assert slots.shape == (6, 3, 32) and slots.dtype == torch.bfloat16
    torch.testing.assert_close(slots.sum(dim=1), summed, atol=0, rtol=0)


@needs_interpreter
def test_fused_bf16_matches_float32_reference() -> None:
    w13, w2 = make_experts(8, 32, 32, torch.bfloat16)
    x = torch.randn(9, 32).to(torch.bfloat16)
    weights, ids = make_routing(9, 8, 2)
    ref = fm.fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    out = fm.fused_moe_triton(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


# ---------------------------------------------------------------------------------- weight loading

def _per_expert_tensors(w13: torch.Tensor, w2: torch.Tensor, prefix: str = "mlp.experts"):
    inter = w2.shape[2]
    for e in range(w13.shape[0]):
        yield f"{prefix}.{e}.gate_proj.weight", w13[e, :inter].clone()
        yield f"{prefix}.{e}.up_proj.weight", w13[e, inter:].clone()
        yield f"{prefix}.{e}.down_proj.weight", w2[e].clone()


class _Holder(torch.nn.Module):
    """A minimal model: `mlp.experts` is a FusedMoE; names map to themselves."""

    def __init__(self, experts: FusedMoE) -> None:
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.experts = experts

    def map_weight_name(self, name: str) -> str:
        return name


def test_weight_loader_streams_per_expert_tensors_into_slots() -> None:
    from ernieserve.layers.moe import load_moe_weights

    w13, w2 = make_experts(4, 16, 12)
    model = _Holder(FusedMoE(4, 2, 16, 12, torch.float32))
    loaded: set[str] = set()
    rest = list(load_moe_weights(model, [("other.weight", torch.zeros(1)), *_per_expert_tensors(w13, w2)], loaded))
    assert [n for n, _ in rest] == ["other.weight"]
    assert loaded == {"mlp.experts.w13", "mlp.experts.w2"}
    assert torch.equal(model.mlp.experts.w13, w13) and torch.equal(model.mlp.experts.w2, w2)


def test_weight_loader_reports_missing_expert_and_shards_for_tp() -> None:
    from ernieserve.layers.moe import load_moe_weights

    w13, w2 = make_experts(4, 16, 12)
    # expert 2's up_proj missing: w13 is not reported loaded, w2 is
    tensors = [t for t in _per_expert_tensors(w13, w2) if t[0] != "mlp.experts.2.up_proj.weight"]
    model = _Holder(FusedMoE(4, 2, 16, 12, torch.float32))
    loaded: set[str] = set()
    list(load_moe_weights(model, tensors, loaded))
    assert loaded == {"mlp.experts.w2"}

    # rank 1 of 2 keeps the second half of every expert's intermediate dimension
    model = _Holder(FusedMoE(4, 2, 16, 12, torch.float32, TPGroup(rank=1, size=2)))
    list(load_moe_weights(model, _per_expert_tensors(w13, w2), set()))
    expect13 = torch.cat([w13[:, 6:12], w13[:, 18:24]], dim=1)
    assert torch.equal(model.mlp.experts.w13, expect13)
    assert torch.equal(model.mlp.experts.w2, w2[:, :, 6:])


def test_weight_loader_accepts_hf_stacked_layout() -> None:
    from ernieserve.layers.moe import load_moe_weights

    w13, w2 = make_experts(4, 16, 12)
    model = _Holder(FusedMoE(4, 2, 16, 12, torch.float32))
    loaded: set[str] = set()
    list(load_moe_weights(model, [("mlp.experts.gate_up_proj", w13), ("mlp.experts.down_proj", w2)], loaded))
    assert loaded == {"mlp.experts.w13", "mlp.experts.w2"}
    assert torch.equal(model.mlp.experts.w13, w13) and torch.equal(model.mlp.experts.w2, w2)


# ------------------------------------------------------------------------------ shared experts folded in

@needs_interpreter
@pytest.mark.parametrize("num_shared", [1, 2, 3])
def test_triton_router_appends_the_folded_shared_experts(num_shared: int) -> None:
    cfg = ernie_cfg(8, 3)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, cfg.num_experts, generator=g)
    bias = torch.randn(cfg.num_experts, generator=g) * 0.1
    ref_w, ref_ids = select_experts(logits, cfg, bias)
    w, ids = fm.triton_select_experts(logits, cfg, bias, num_shared)
    assert ids.shape == (7, 3 + num_shared)
    assert torch.equal(ids[:, :3].long(), ref_ids)
    torch.testing.assert_close(w[:, :3], ref_w, atol=1e-6, rtol=1e-6)  # still renormalised over the routed ones
    assert torch.equal(ids[:, 3:].long(), torch.arange(8, 8 + num_shared).expand(7, num_shared))
    assert torch.equal(w[:, 3:], torch.ones(7, num_shared))


def _folded_from(full, tp: TPGroup, quantization=None):
    """ERNIE's block built with its shared experts folded in, loaded from `full` (one rank, shared
    MLP apart) the way a checkpoint loads: routed experts one by one, the shared MLP's HF-layout
    tensors through load_folded_shared."""
    from ernieserve.layers.moe import MoEBlock
    from ernieserve.layers.moe.layer import load_folded_shared
    from ernieserve.layers.quantization.base import quantization_scope

    e, hidden, inter = full.experts.num_experts, full.experts.w13.shape[2], full.experts.inter
    with quantization_scope(quantization):
        block = MoEBlock(TopKRouter(hidden, full.gate.cfg, torch.float32),
                         FusedMoE(e, full.experts.top_k, hidden, inter, torch.float32, tp, shared_slots=2))
    block.gate.load_state_dict(full.gate.state_dict())
    for k in range(e):
        block.experts.weight_loader(None, full.experts.w13[k, :inter], (k, "gate"))
        block.experts.weight_loader(None, full.experts.w13[k, inter:], (k, "up"))
        block.experts.weight_loader(None, full.experts.w2[k], (k, "down"))
    gate, up = full.shared_experts.gate_up_proj.weight.chunk(2)  # [S * I, H] each
    load_folded_shared(block.experts, "gate", gate)
    load_folded_shared(block.experts, "up", up)
    load_folded_shared(block.experts, "down", full.shared_experts.down_proj.weight)  # [H, S * I]
    for m in block.modules():
        if getattr(m, "method", None) is not None:
            m.method.process_weights_after_loading(m)
    return block


def _ernie_block_with_shared_mlp(hidden: int = 16, inter: int = 12):
    from ernieserve.layers.moe import MoEBlock
    from ernieserve.models.decoder import DecoderMLP

    g = torch.Generator().manual_seed(9)
    one = TPGroup(0, 1)
    full = MoEBlock(TopKRouter(hidden, ernie_cfg(8, 2), torch.float32), FusedMoE(8, 2, hidden, inter, torch.float32, one),
                    DecoderMLP(hidden, 2 * inter, False, torch.float32, one))
    for p in full.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return full, torch.randn(5, hidden, generator=g)


def test_shared_experts_folded_into_the_routed_ones_give_the_same_output() -> None:
    """ERNIE's MoE block (8 experts, top-2, two shared experts), fp32: built with the shared MLP as
    two always-chosen experts and loaded from the same tensors, it computes the same function."""
    full, x = _ernie_block_with_shared_mlp()
    folded = _folded_from(full, TPGroup(0, 1))
    assert folded.shared_experts is None and folded.num_folded_shared == 2
    assert folded.experts.w13.shape[0] == 10 and folded.experts.num_local_experts == 10
    torch.testing.assert_close(folded(x), full(x), atol=1e-5, rtol=1e-5)


def test_folded_shared_experts_split_over_tensor_parallel_ranks() -> None:
    """Each rank keeps its slice of every expert, the folded shared ones included: the ranks'
    partial sums add up to the one-rank block's output."""
    class OneRankOfTwo(TPGroup):  # this rank's partial sum: the all-reduce would add the other's
        def all_reduce(self, x):
            return x

    full, x = _ernie_block_with_shared_mlp()
    parts = [_folded_from(full, OneRankOfTwo(r, 2))(x) for r in (0, 1)]
    torch.testing.assert_close(parts[0] + parts[1], full(x), atol=1e-5, rtol=1e-5)


def test_quantized_shared_experts_fold_with_the_routed_ones() -> None:
    """wint8: the shared experts are quantized like the routed ones, per output channel; the
    folded block matches the bf16-free reference within int8's rounding."""
    from ernieserve.layers.quantization import parse_quantization

    full, x = _ernie_block_with_shared_mlp()
    folded = _folded_from(full, TPGroup(0, 1), parse_quantization("wint8"))
    assert folded.experts.expert_quant.experts.num_experts == 10
    ref = full(x)
    assert ((folded(x) - ref).norm() / ref.norm()).item() < 0.02


def test_expert_parallel_keeps_shared_experts_apart() -> None:
    e = FusedMoE(8, 2, 16, 12, torch.float32, TPGroup(0, 1), expert_parallel=True, shared_slots=2)
    assert e.shared_slots == 0 and e.num_local_experts == 8
    with pytest.raises(ValueError, match="out of range"):
        e.weight_loader(None, torch.zeros(12, 16), (8, "gate"))


@pytest.mark.parametrize("rows", [1, 100, 2000, 50000])
def test_tiles_fit_the_shared_memory_for_every_operand_width(rows: int) -> None:
    """The swept tiles hold bf16 operands; float32 operands (the fp32 oracle runs) get fewer stages
    or a shorter K step instead of a launch the GPU refuses (H100: 227 KiB of shared memory)."""
    from ernieserve.layers.moe.fused_moe import _SMEM_BUDGET, choose_tile_config, fit_tile

    tiles = choose_tile_config(rows, 10)
    for tile, b_tiles in ((tiles.gate_up, 2), (tiles.down, 1)):
        assert fit_tile(tile, tiles.block_m, b_tiles, 2) == tile  # the sweep's choice stands
        t32 = fit_tile(tile, tiles.block_m, b_tiles, 4)
        assert t32.num_stages * (tiles.block_m + b_tiles * t32.block_n) * t32.block_k * 4 <= _SMEM_BUDGET
        assert t32.block_n == tile.block_n and t32.num_stages >= 2
