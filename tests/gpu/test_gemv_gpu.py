"""The dense decode GEMV (kernels/gemv.py) on a real GPU: against torch's linear at ERNIE 4.5
shapes, 1..8 rows, with split K, bias, and inside a replayed CUDA graph.

Run on the device machine with ``pytest -m gpu tests/gpu/test_gemv_gpu.py`` (TRITON_INTERPRET unset).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from ernieserve.kernels.gemv import choose_gemv_tiles, gemv  # noqa: E402

DEV = torch.device("cuda")
SHAPES = [(3584, 2560), (2560, 2560), (2560, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (1000, 1000)]


@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_matches_fp32_linear(m: int, n: int, k: int) -> None:
    g = torch.Generator(device=DEV).manual_seed(n + k + m)
    x = torch.randn(m, k, device=DEV, generator=g).bfloat16()
    w = (torch.randn(n, k, device=DEV, generator=g) / k ** 0.5).bfloat16()
    b = torch.randn(n, device=DEV, generator=g).bfloat16()
    assert choose_gemv_tiles(m, n, k, DEV).split_k > 1 or n * k < 2e6
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    out = gemv(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    # fp32 accumulation, one bf16 rounding of the output
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
    # the fixed-order split-K reduction: the same bits on every call
    assert torch.equal(gemv(x, w, b), out)


def test_gemv_replays_in_a_cuda_graph() -> None:
    x = torch.randn(1, 2560, device=DEV).bfloat16()
    w = (torch.randn(3584, 2560, device=DEV) / 50).bfloat16()
    out = gemv(x, w)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gemv(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gemv(x, w)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured.float(), torch.nn.functional.linear(x.float(), w.float()),
                                   atol=2e-2, rtol=1e-2)
    assert out.shape == captured.shape
