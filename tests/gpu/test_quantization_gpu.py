"""Quantized GEMMs and quantized serving on a real GPU (bf16, real ERNIE 4.5 shapes).

Run on the device machine with ``pytest -m gpu tests/gpu/test_quantization_gpu.py`` (TRITON_INTERPRET
unset). Covers: the Triton weight-only and FP8 kernels against their references at decode and
prefill shapes of ERNIE-4.5-0.3B and 21B-A3B (including split K and group-wise int4), the torch
built-in backends against the same references, CUDA-graph capture and replay of a quantized
layer, end-to-end serving of the 0.3B preset with each method, and the peak device memory of
loading with wint4 vs the bf16 model.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from ernieserve.kernels import fp8_matmul as f8  # noqa: E402
from ernieserve.kernels import quant_matmul as qm  # noqa: E402
from ernieserve.kernels.quant_matmul import GemmBackend  # noqa: E402
from ernieserve.layers.linear import RowParallelLinear  # noqa: E402
from ernieserve.layers.quantization import (  # noqa: E402
    Fp8Config,
    WeightOnlyConfig,
    quantization_scope,
    scoped_linear_method,
)

DEV = torch.device("cuda")
HOPPER = torch.cuda.get_device_capability() >= (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="FP8 GEMMs need sm90+")

# (N, K) of the quantized projections: 0.3B qkv / o / gate_up / down, 21B-A3B qkv / dense down /
# shared-expert gate_up / an expert-sized down
LAYERS = [(2560, 1024), (1024, 2048), (6144, 1024), (1024, 3072),
          (3584, 2560), (2560, 12288), (6144, 2560), (2560, 1536)]
TOKENS = [1, 7, 32, 512, 2049]  # decode (split K), small batch, prefill; 7 and 2049 not tile multiples


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, device=DEV, generator=torch.Generator(device=DEV).manual_seed(seed)) * 0.02


# Kernels accumulate in fp32 like the references; the outputs differ by bf16 rounding and the fp32
# summation order only. 4e-3 relative (about one bf16 ulp in RMS) is the bound.
KERNEL_TOL = 4e-3


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 128), (8, 128), (4, 64)])
@pytest.mark.parametrize("shape", LAYERS, ids=str)
@pytest.mark.parametrize("m", TOKENS)
def test_weight_only_kernel_vs_reference(bits, group, shape, m):
    n, k = shape
    w = _weights(n, k)
    q, s = (qm.quantize_int8 if bits == 8 else qm.quantize_int4)(w, group)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    out = qm.weight_only_matmul(x, q, s, bits, group, bias)
    ref = qm.weight_only_matmul_ref(x, q, s, bits, group, bias)
    assert rel_err(out, ref) < KERNEL_TOL


@pytest.mark.parametrize("bits,group", [(4, 0), (4, 128), (8, 0)])
@pytest.mark.parametrize("shape", [(1000, 999), (333, 1000)], ids=str)
@pytest.mark.parametrize("m", [1, 7, 300])
def test_weight_only_kernel_odd_shapes(bits, group, shape, m):
    """N and K not tile multiples: masked last K steps (loads that cannot vectorise), an odd K
    (int4 pads each row's last byte) and, grouped, a partial last group."""
    n, k = shape
    q, s = (qm.quantize_int8 if bits == 8 else qm.quantize_int4)(_weights(n, k, seed=3), group)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    out = qm.weight_only_matmul(x, q, s, bits, group)
    assert rel_err(out, qm.weight_only_matmul_ref(x, q, s, bits, group)) < KERNEL_TOL


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 16, 512])
def test_torch_builtin_backends_vs_reference(bits, m):
    n, k = 2560, 2560
    q, s = (qm.quantize_int8 if bits == 8 else qm.quantize_int4)(_weights(n, k), 0)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    ref = qm.weight_only_matmul_ref(x, q, s, bits, 0)
    if bits == 8:
        out = qm.int8pack_matmul(x, q, s)
    else:
        packed, sz, g = qm.to_int4pack(q, s, k, 0, torch.bfloat16)
        out = qm.int4pack_matmul(x, packed, sz, g)
    assert rel_err(out, ref) < 1e-2  # tinygemm keeps scales in bf16


@needs_hopper
@pytest.mark.parametrize("block_wise", [True, False])
@pytest.mark.parametrize("shape", LAYERS, ids=str)
@pytest.mark.parametrize("m", TOKENS)
def test_fp8_kernels_vs_reference(block_wise, shape, m):
    n, k = shape
    wq, ws = (f8.quantize_fp8_blockwise if block_wise else f8.quantize_fp8_per_channel)(_weights(n, k))
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    group = 128 if block_wise else 0
    xq, xs = f8.quant_fp8_per_token_group(x, group)
    xq_ref, xs_ref = f8.quant_fp8_per_token_group_ref(x, group)
    torch.testing.assert_close(xs, xs_ref, rtol=1e-6, atol=0)
    assert (xq.float() != xq_ref.float()).float().mean() < 1e-3  # hardware vs torch cast: ties only
    out = f8.fp8_matmul(xq, xs, wq, ws, block_wise, torch.bfloat16, tiles=f8.fp8_tiles(m, n, k, DEV))
    assert rel_err(out, f8.fp8_matmul_ref(xq, xs, wq, ws, block_wise, torch.bfloat16)) < KERNEL_TOL
    if not block_wise:
        out = f8.scaled_mm_per_channel(xq, xs, wq, ws, torch.bfloat16)
        assert rel_err(out, f8.fp8_matmul_ref(xq, xs, wq, ws, False, torch.bfloat16)) < KERNEL_TOL


def _quantized_layer(config, n: int, k: int) -> RowParallelLinear:
    with torch.device(DEV), quantization_scope(config):
        layer = RowParallelLinear(k, n, bias=False, dtype=torch.bfloat16, method=scoped_linear_method())
    layer.weight.weight_loader(layer.weight, _weights(n, k).to(torch.bfloat16), None)
    return layer


CONFIGS = [WeightOnlyConfig(8), WeightOnlyConfig(4), WeightOnlyConfig(4, 128),
           WeightOnlyConfig(8, 0, GemmBackend.TORCH), WeightOnlyConfig(4, 128, GemmBackend.TORCH)]
FP8_CONFIGS = [Fp8Config(True), Fp8Config(False), Fp8Config(False, GemmBackend.TORCH)]


@pytest.mark.parametrize("config", CONFIGS + (FP8_CONFIGS if HOPPER else []), ids=lambda c: c.describe())
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_quantized_layer_under_cuda_graph(config, batch):
    n, k = 2560, 3072
    layer = _quantized_layer(config, n, k)
    static_x = torch.zeros(batch, k, device=DEV, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(static_x)  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    for seed in range(3):
        static_x.copy_(torch.randn(batch, k, device=DEV, generator=torch.Generator(device=DEV).manual_seed(seed)))
        graph.replay()
        torch.testing.assert_close(static_out, layer(static_x), atol=0, rtol=0)


@pytest.fixture(scope="module")
def ernie_03b(tmp_path_factory):
    from ernieserve.checkpoint.dummy import write_dummy_checkpoint

    return write_dummy_checkpoint("ernie-4.5-0.3b", tmp_path_factory.mktemp("e03b-q"), dtype="bfloat16")


def _serve(path, quantization, extra=None):
    from ernieserve import LLM, SamplingParams

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=16, quantization=quantization,
              quantization_config=extra, num_gpu_blocks_override=64)
    outs = llm.generate([{"prompt_token_ids": list(range(100, 160))}] * 4,
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    result = tokens, llm.model_param_bytes()
    del llm
    torch.cuda.empty_cache()
    return result


@pytest.mark.parametrize("quantization", ["wint8", "wint4"] + (["block_wise_fp8", "fp8"] if HOPPER else []))
def test_serving_03b_with_each_method(ernie_03b, quantization):
    ref_tokens, ref_bytes = _serve(ernie_03b, None)
    tokens, nbytes = _serve(ernie_03b, quantization)
    assert nbytes < ref_bytes
    assert all(len(t) == 16 for t in tokens)
    assert tokens[0] == tokens[3]  # same prompt, same batch: same greedy output
    agree = sum(a == b for t, r in zip(tokens, ref_tokens) for a, b in zip(t, r)) / (16 * 4)
    print(f"{quantization}: {nbytes / ref_bytes:.2f}x weight bytes, greedy agreement with bf16 {agree:.0%}")


def test_loading_with_wint4_never_holds_the_bf16_model(ernie_03b):
    """Peak device memory while building and loading stays near the quantized size, far under
    the bf16 weights (the quantized layers stream one layer at a time)."""
    from ernieserve.attention.torch_ref import TorchRefBackend
    from ernieserve.config import EngineArgs
    from ernieserve.models.loader import build_model

    peaks = {}
    for quantization in (None, "wint4"):
        cfg = EngineArgs(model=str(ernie_03b), dtype="bfloat16", quantization=quantization,
                         max_model_len=1024).create_engine_config()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model = build_model(cfg.model, TorchRefBackend(), DEV)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        peaks[quantization] = (torch.cuda.max_memory_allocated() - base, weights)
        del model
    bf16_peak, bf16_bytes = peaks[None]
    q_peak, q_bytes = peaks["wint4"]
    saved = bf16_bytes - q_bytes
    print(f"peak while loading: bf16 {bf16_peak / 2**20:.0f} MiB, wint4 {q_peak / 2**20:.0f} MiB "
          f"(weights {bf16_bytes / 2**20:.0f} -> {q_bytes / 2**20:.0f} MiB)")
    # quantized weights + one layer's bf16 staging (at most 12 MiB here) + the fp32 temporaries of
    # quantizing one row chunk (about 60 MiB): far below the bf16 model
    assert q_peak < q_bytes + 0.35 * saved
    assert q_peak < 0.6 * bf16_peak
