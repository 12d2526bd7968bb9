"""Quantized routed experts on the GPU at ERNIE-4.5-21B-A3B's expert shapes (E 64, top-6, H 2560,
I 1536), bf16 activations. Run with ``pytest -m gpu tests/gpu/test_moe_quant_gpu.py``.

* every scheme's fused Triton path against its plain-torch reference (same quantized weights),
  decode and prefill token counts, default tiles (split K at decode) and explicit ones;
* each scheme's output against the unquantized experts, within the scheme's error;
* CUDA-graph capture and replay of a quantized MoE layer at decode sizes;
* int4 nibbles -> bf16 / fp16 / fp32 by bit tricks, exact for every byte; the prefill (dequant)
  path against the reference, taken by the token threshold, its scratch sized once and reused;
* loading 64 experts through the streaming weight loader: peak device memory stays the quantized
  layer plus one projection, never the bf16 stacked weight;
* serving the tiny ERNIE MoE preset with each method through `LLM` (the per-assignment GEMVs of
  moe_gemv.py at one token: tests/gpu/test_moe_assign_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from ernieserve.kernels.quant_matmul import GemmBackend
from ernieserve.layers.moe import fused_moe as fm
from ernieserve.layers.moe import fused_moe_quant as fmq
from ernieserve.layers.moe.fused_moe import GemmTile
from ernieserve.layers.moe.fused_moe_quant import (
    DequantScratch,
    ExpertScheme,
    QuantizedExperts,
    QuantMoEPath,
    QuantMoETiles,
)
from tests.gpu.graph_capture import capture

CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability() >= (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

E, TOP_K, H, I = 64, 6, 2560, 1536
SCHEMES = [(ExpertScheme.WINT8, 0), (ExpertScheme.WINT4, 0), (ExpertScheme.WINT4, 128), (ExpertScheme.WINT8, 128),
           pytest.param(ExpertScheme.FP8, 0, marks=pytest.mark.skipif(not HOPPER, reason="fp8 needs sm90+")),
           pytest.param(ExpertScheme.BLOCK_FP8, 0, marks=pytest.mark.skipif(not HOPPER, reason="fp8 needs sm90+"))]
SCHEME_IDS = ["wint8", "wint4", "wint4-g128", "wint8-g128", "fp8", "block_wise_fp8"]
WINT_ODD = [(ExpertScheme.WINT4, 0), (ExpertScheme.WINT4, 128), (ExpertScheme.WINT8, 0)]
WINT_ODD_IDS = ["wint4", "wint4-g128", "wint8"]
TOKENS = [1, 7, 64, 300, 4096]  # decode (split K), small batches, prefill; 7 and 300 not tile multiples

# Kernel vs reference on the same quantized weights: both accumulate in fp32 and round the
# activation and each assignment's output to bf16; they differ by summation order and, for fp8, by
# activations whose bf16 rounding differs and so re-quantize one e4m3 step apart.
KERNEL_TOL = {False: 1e-2, True: 2e-2}  # keyed by "is fp8"
# vs the unquantized experts (tests/layers/test_moe_quant.py derives these at small shapes)
SCHEME_TOL = {ExpertScheme.WINT8: 0.02, ExpertScheme.WINT4: 0.3, ExpertScheme.FP8: 0.09, ExpertScheme.BLOCK_FP8: 0.09}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def bf16_experts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I**0.5).bfloat16()
    return w13, w2


_QUANTIZED: dict[tuple[ExpertScheme, int], QuantizedExperts] = {}


def quantized(bf16_experts, scheme: ExpertScheme, group: int) -> QuantizedExperts:
    """One quantized copy per scheme, projection by projection as the loader does."""
    key = (scheme, group)
    if key not in _QUANTIZED:
        _QUANTIZED.clear()  # one copy at a time: the bf16 experts are 1.5 GB already
        w13, w2 = bf16_experts
        experts = QuantizedExperts.empty(scheme, group, E, H, I, torch.device("cuda"))
        for e in range(E):
            for proj, w in (("gate", w13[e, :I]), ("up", w13[e, I:]), ("down", w2[e])):
                experts.store(e, proj, *fmq.quantize_rows(w, scheme, group))
        _QUANTIZED[key] = experts
    return _QUANTIZED[key]


def route(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ernieserve.layers.moe import RouterConfig

    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(num_tokens, E, device="cuda", generator=g)
    return fm.triton_select_experts(logits, RouterConfig(E, TOP_K, True, 1e-12, True, False), None)


@pytest.mark.parametrize("scheme,group", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_fused_matches_reference(bf16_experts, scheme: ExpertScheme, group: int, num_tokens: int) -> None:
    experts = quantized(bf16_experts, scheme, group)
    x = torch.randn(num_tokens, H, device="cuda").bfloat16()
    weights, ids = route(num_tokens, seed=num_tokens)
    out = fmq.fused_moe_quant_triton(x, experts, weights, ids)
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = fmq.fused_moe_quant_ref(x, experts, weights, ids)
    assert rel_err(out, ref) < KERNEL_TOL[scheme.is_fp8]
    w13, w2 = bf16_experts
    unquantized = fm.fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    assert rel_err(out, unquantized) < SCHEME_TOL[scheme]


@pytest.mark.parametrize("scheme,group", WINT_ODD, ids=WINT_ODD_IDS)
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_fused_odd_shapes(scheme: ExpertScheme, group: int, num_tokens: int) -> None:
    """H and I not multiples of BLOCK_K (masked last K steps: the weight loads that cannot
    vectorise, through the same inline-PTX conversion) nor of BLOCK_N, an odd I (int4 pads the
    last byte of each down row) and, grouped, a partial last group."""
    e, h, i = 8, 1000, 333
    g = torch.Generator(device="cuda").manual_seed(5)
    w13 = (torch.randn(e, 2 * i, h, device="cuda", generator=g) / h**0.5).bfloat16()
    w2 = (torch.randn(e, h, i, device="cuda", generator=g) / i**0.5).bfloat16()
    experts = QuantizedExperts.empty(scheme, group, e, h, i, torch.device("cuda"))
    for ex in range(e):
        for proj, w in (("gate", w13[ex, :i]), ("up", w13[ex, i:]), ("down", w2[ex])):
            experts.store(ex, proj, *fmq.quantize_rows(w, scheme, group))
    x = torch.randn(num_tokens, h, device="cuda").bfloat16()
    logits = torch.randn(num_tokens, e, device="cuda", generator=g)
    from ernieserve.layers.moe import RouterConfig

    weights, ids = fm.triton_select_experts(logits, RouterConfig(e, 2, True, 1e-12, True, False), None)
    out = fmq.fused_moe_quant_triton(x, experts, weights, ids, path=fmq.QuantMoEPath.FUSED)
    assert rel_err(out, fmq.fused_moe_quant_ref(x, experts, weights, ids)) < KERNEL_TOL[False]


@pytest.mark.parametrize("scheme,group", SCHEMES, ids=SCHEME_IDS)
def test_explicit_tiles_and_split_k(bf16_experts, scheme: ExpertScheme, group: int) -> None:
    experts = quantized(bf16_experts, scheme, group)
    x = torch.randn(5, H, device="cuda").bfloat16()
    weights, ids = route(5, seed=1)
    ref = fmq.fused_moe_quant_ref(x, experts, weights, ids)
    bk = min(128, experts.scale_group or 128)
    for tiles in (QuantMoETiles(16, GemmTile(64, bk, 4, 3), GemmTile(64, bk, 4, 3), 1),
                  QuantMoETiles(16, GemmTile(32, bk, 4, 4), GemmTile(128, bk, 4, 4), 4),
                  QuantMoETiles(64, GemmTile(128, bk // 2, 8, 3), GemmTile(128, bk // 2, 8, 3), 2)):
        assert rel_err(fmq.fused_moe_quant_triton(x, experts, weights, ids, tiles), ref) < KERNEL_TOL[scheme.is_fp8]


def test_all_tokens_on_one_expert_and_foreign_experts(bf16_experts) -> None:
    experts = quantized(bf16_experts, ExpertScheme.WINT4, 128)
    x = torch.randn(300, H, device="cuda").bfloat16()
    ids = torch.full((300, 1), 17, dtype=torch.int32, device="cuda")
    weights = torch.ones(300, 1, device="cuda")
    out = fmq.fused_moe_quant_triton(x, experts, weights, ids)
    assert rel_err(out, fmq.fused_moe_quant_ref(x, experts, weights, ids)) < KERNEL_TOL[False]
    # expert parallelism: ids == E belong to another rank and contribute nothing
    weights, ids = route(64, seed=2)
    foreign = torch.where(ids % 2 == 0, ids, E)
    out = fmq.fused_moe_quant_triton(x[:64], experts, weights, foreign, foreign_experts=True)
    kept = torch.where(ids % 2 == 0, weights, 0.0)
    assert rel_err(out, fmq.fused_moe_quant_ref(x[:64], experts, kept, ids)) < KERNEL_TOL[False]


@pytest.mark.parametrize("scheme,group", [(ExpertScheme.WINT8, 0), (ExpertScheme.WINT4, 128),
                                          pytest.param(ExpertScheme.BLOCK_FP8, 0, marks=pytest.mark.skipif(
                                              not HOPPER, reason="fp8 needs sm90+"))],
                         ids=["wint8", "wint4-g128", "block_wise_fp8"])
@pytest.mark.parametrize("num_tokens", [1, 8, 64])
def test_quantized_moe_under_cuda_graph(bf16_experts, scheme: ExpertScheme, group: int, num_tokens: int) -> None:
    experts = quantized(bf16_experts, scheme, group)
    x = torch.randn(num_tokens, H, device="cuda").bfloat16()
    weights, ids = route(num_tokens, seed=3)
    static = [x.clone(), weights.clone(), ids.clone()]

    def run() -> torch.Tensor:
        return fmq.fused_moe_quant_triton(static[0], experts, static[1], static[2])

    graph, captured = capture(run)  # compiled and the allocator warmed outside the capture
    for seed in (4, 5):  # new inputs and routing, replayed without re-capture
        x2 = torch.randn(num_tokens, H, device="cuda").bfloat16()
        w2_, ids2 = route(num_tokens, seed=seed)
        static[0].copy_(x2)
        static[1].copy_(w2_)
        static[2].copy_(ids2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, fmq.fused_moe_quant_triton(x2, experts, w2_, ids2))


if CUDA:
    import triton
    import triton.language as tl

    @triton.jit
    def _int4_values_probe(byte_ptr, like_ptr, out_ptr, INLINE_ASM: tl.constexpr):
        j = tl.arange(0, 256)
        low, high = fmq._int4_values(tl.load(byte_ptr + j), tl.load(like_ptr + j).dtype, INLINE_ASM)
        tl.store(out_ptr + j, low)
        tl.store(out_ptr + 256 + j, high)


@pytest.mark.parametrize("inline_asm", [True, False], ids=["ptx", "triton-ops"])  # the kernels' PTX path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int4_values_exact_for_every_byte(dtype: torch.dtype, inline_asm: bool) -> None:
    from ernieserve.kernels.quant_matmul import unpack_int4

    byte = torch.arange(256, dtype=torch.int32, device="cuda").to(torch.uint8)
    out = torch.empty(512, dtype=dtype, device="cuda")
    _int4_values_probe[(1,)](byte, torch.zeros(256, dtype=dtype, device="cuda"), out, inline_asm)
    q = unpack_int4(byte[:, None], 2)  # [256, 2]: low nibble, high nibble as q
    assert torch.equal(out.float(), torch.cat([q[:, 0], q[:, 1]]).float())


if CUDA:
    from ernieserve.kernels.quant_matmul import int4_values_f32, int8_values_f32

    @triton.jit
    def _f32_values_probe(byte_ptr, q8_ptr, out_ptr, INLINE_ASM: tl.constexpr):
        j = tl.arange(0, 256)
        low, high = int4_values_f32(tl.load(byte_ptr + j), INLINE_ASM)
        tl.store(out_ptr + j, low)
        tl.store(out_ptr + 256 + j, high)
        tl.store(out_ptr + 512 + j, int8_values_f32(tl.load(q8_ptr + j), INLINE_ASM))


@pytest.mark.parametrize("inline_asm", [True, False], ids=["ptx", "triton-ops"])
@pytest.mark.parametrize("num_warps", [1, 4])
def test_fp32_values_of_the_gemvs_exact_for_every_byte(inline_asm: bool, num_warps: int) -> None:
    """The CUDA-core GEMVs' conversions (quant_matmul.int4_values_f32 / int8_values_f32): every
    packed int4 byte and every int8 value, 8 or 2 per thread (a byte's place in its register matters
    to the PTX)."""
    from ernieserve.kernels.quant_matmul import unpack_int4

    byte = torch.arange(256, dtype=torch.int32, device="cuda").to(torch.uint8)
    q8 = torch.arange(-128, 128, dtype=torch.int32, device="cuda").to(torch.int8).roll(37)
    out = torch.empty(768, dtype=torch.float32, device="cuda")
    _f32_values_probe[(1,)](byte, q8, out, inline_asm, num_warps=num_warps)
    q = unpack_int4(byte[:, None], 2)  # [256, 2]: low nibble, high nibble as q
    assert torch.equal(out[:512], torch.cat([q[:, 0], q[:, 1]]).float())
    assert torch.equal(out[512:], q8.float())


WINT = [(ExpertScheme.WINT4, 0), (ExpertScheme.WINT4, 128), (ExpertScheme.WINT8, 0), (ExpertScheme.WINT8, 128)]
WINT_IDS = ["wint4", "wint4-g128", "wint8", "wint8-g128"]


@pytest.mark.parametrize("scheme,group", WINT, ids=WINT_IDS)
@pytest.mark.parametrize("num_tokens", [300, 4096])
def test_dequant_path_matches_reference(bf16_experts, scheme: ExpertScheme, group: int, num_tokens: int) -> None:
    experts = quantized(bf16_experts, scheme, group)
    x = torch.randn(num_tokens, H, device="cuda").bfloat16()
    weights, ids = route(num_tokens, seed=num_tokens + 1)
    scratch = DequantScratch()
    out = fmq.fused_moe_quant_triton(x, experts, weights, ids, scratch=scratch, path=QuantMoEPath.DEQUANT)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, fmq.fused_moe_quant_ref(x, experts, weights, ids)) < KERNEL_TOL[False]
    assert scratch.nbytes() == E * 2 * I * H * 2  # w13 of one layer in bf16; w2 reuses it
    fused = fmq.fused_moe_quant_triton(x, experts, weights, ids, path=QuantMoEPath.FUSED)
    assert rel_err(out, fused) < KERNEL_TOL[False]


def test_auto_path_takes_dequant_from_the_threshold_and_reuses_the_scratch(bf16_experts) -> None:
    experts = quantized(bf16_experts, ExpertScheme.WINT4, 128)  # group-wise: the scheme with a threshold
    threshold = fmq.DEQUANT_MIN_TOKENS[ExpertScheme.WINT4, True]
    scratch = DequantScratch()
    x = torch.randn(threshold, H, device="cuda").bfloat16()
    weights, ids = route(threshold, seed=7)
    fmq.fused_moe_quant_triton(x[:threshold - 1], experts, weights[:threshold - 1], ids[:threshold - 1],
                               scratch=scratch)
    assert scratch.buffer is None  # below the threshold: the fused kernels
    out = fmq.fused_moe_quant_triton(x, experts, weights, ids, scratch=scratch)
    assert scratch.nbytes() == E * 2 * I * H * 2
    assert rel_err(out, fmq.fused_moe_quant_ref(x, experts, weights, ids)) < KERNEL_TOL[False]
    torch.cuda.synchronize()
    allocated, ptr = torch.cuda.memory_allocated(), scratch.buffer.data_ptr()
    fmq.fused_moe_quant_triton(x, experts, weights, ids, scratch=scratch)  # another layer, same buffer
    torch.cuda.synchronize()
    assert scratch.buffer.data_ptr() == ptr and torch.cuda.memory_allocated() <= allocated + x.numel() * 2


def test_dequant_path_under_cuda_graph(bf16_experts) -> None:
    """Capturable once the scratch exists (the engine's profiling step allocates it before capture)."""
    experts = quantized(bf16_experts, ExpertScheme.WINT4, 128)
    scratch = DequantScratch()
    x = torch.randn(512, H, device="cuda").bfloat16()
    weights, ids = route(512, seed=8)
    static = [x.clone(), weights.clone(), ids.clone()]

    def run() -> torch.Tensor:
        return fmq.fused_moe_quant_triton(static[0], experts, static[1], static[2], scratch=scratch,
                                          path=QuantMoEPath.DEQUANT)

    graph, captured = capture(run)  # compiled and the allocator warmed outside the capture
    w2_, ids2 = route(512, seed=9)
    static[1].copy_(w2_)
    static[2].copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, fmq.fused_moe_quant_triton(x, experts, w2_, ids2, scratch=scratch,
                                                            path=QuantMoEPath.DEQUANT))


def test_streaming_load_peak_memory_is_the_quantized_layer(bf16_experts) -> None:
    """64 experts through FusedMoE.weight_loader: the device never holds the bf16 stacked weight."""
    from ernieserve.layers.moe import FusedMoE
    from ernieserve.layers.quantization import WeightOnlyConfig, quantization_scope

    w13, w2 = bf16_experts
    host = [(w13[e, :I].cpu(), w13[e, I:].cpu(), w2[e].cpu()) for e in range(E)]  # the checkpoint, on the host
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.device("cuda"), quantization_scope(WeightOnlyConfig(4, 128)):
        layer = FusedMoE(E, TOP_K, H, I, torch.bfloat16)
    for e, (gate, up, down) in enumerate(host):
        layer.weight_loader(layer.w13, gate, (e, "gate"))
        layer.weight_loader(layer.w13, up, (e, "up"))
        layer.weight_loader(layer.w2, down, (e, "down"))
    torch.cuda.synchronize()
    quantized_bytes = layer.expert_quant.experts.nbytes()
    projection_fp32 = I * H * 4  # one projection's fp32 copy; quantizing it takes a few such temporaries
    peak = torch.cuda.max_memory_allocated() - base
    assert layer.w13 is None and layer.w13_qweight.dtype == torch.uint8
    assert quantized_bytes < 0.3 * w13.numel() * 2 * 1.5  # int4 + group scales vs bf16 w13 + w2
    # ~400 MB of int4 experts + at most ~125 MB of one projection's temporaries, vs 1.5 GB in bf16
    assert peak < quantized_bytes + 8 * projection_fp32, (peak, quantized_bytes)
    x = torch.randn(16, H, device="cuda").bfloat16()
    weights, ids = route(16, seed=6)
    out = layer(x, weights, ids)
    assert rel_err(out, fmq.fused_moe_quant_ref(x, layer.expert_quant.experts, weights, ids)) < KERNEL_TOL[False]


@pytest.mark.parametrize("quantization,extra", [
    ("wint8", None), ("wint4", None), ("wint4", '{"group_size": 32}'),
    pytest.param("fp8", None, marks=pytest.mark.skipif(not HOPPER, reason="fp8 needs sm90+")),
    pytest.param("block_wise_fp8", None, marks=pytest.mark.skipif(not HOPPER, reason="fp8 needs sm90+")),
], ids=["wint8", "wint4", "wint4-g32", "fp8", "block_wise_fp8"])
def test_serving_tiny_ernie_moe_with_each_method(tmp_path_factory, quantization: str, extra: str | None) -> None:
    from ernieserve import LLM, SamplingParams
    from ernieserve.checkpoint.dummy import write_dummy_checkpoint
    from ernieserve.layers.moe import FusedMoE

    path = write_dummy_checkpoint("tiny-ernie-4.5-moe", tmp_path_factory.mktemp("moe"), dtype="bfloat16")
    llm = LLM(model=str(path), dtype="bfloat16", quantization=quantization, quantization_config=extra,
              max_model_len=256, max_num_seqs=16, num_gpu_blocks_override=64)
    model = llm.llm_engine.core.runner.model
    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert layers and all(m.w13 is None and m.w13_qweight.is_cuda for m in layers)
    assert all(m.expert_quant.triton for m in layers)
    out = llm.generate([{"prompt_token_ids": [5, 17, 300, 42, 9]}] * 3,
                       SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in out)
    assert len({tuple(o.outputs[0].token_ids) for o in out}) == 1  # the same prompt, the same greedy tokens


def test_reference_backend_is_honoured_on_gpu() -> None:
    from ernieserve.layers.moe import FusedMoE
    from ernieserve.layers.quantization import WeightOnlyConfig, quantization_scope

    with torch.device("cuda"), quantization_scope(WeightOnlyConfig(8, 0, GemmBackend.REFERENCE)):
        layer = FusedMoE(4, 2, 64, 32, torch.bfloat16)
    assert not layer.expert_quant.triton
