"""The dense decode GEMV (kernels/gemv.py) against torch's linear, in the Triton interpreter at
small shapes: N and K not multiples of the tiles, split K (the in-launch reduction), 1..8 rows,
bias, and both accumulation forms."""

from __future__ import annotations

import pytest
import torch

from interpreter import require_interpreter  # noqa: E402 (tests/kernels)

triton = require_interpreter()

from ernieserve.kernels.gemv import GemvTiles, choose_gemv_tiles, gemv  # noqa: E402


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(40, 96), (33, 200)])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(m: int, n: int, k: int, split: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 100 + n + split)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    bm = triton.next_power_of_2(m)
    tiles = GemvTiles(bm, 16, 32, split, 4)
    out = gemv(x, w, b, tiles)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_gemv_keeps_leading_dims_and_dtype() -> None:
    x = torch.randn(2, 1, 64).to(torch.bfloat16)
    w = (torch.randn(48, 64) / 8).to(torch.bfloat16)
    out = gemv(x, w, tiles=GemvTiles(2, 16, 32, 2, 4))
    assert out.shape == (2, 1, 48) and out.dtype == torch.bfloat16
    ref = torch.nn.functional.linear(x.float(), w.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_tiles_fill_the_device_and_bound_the_registers() -> None:
    t = choose_gemv_tiles(1, 3584, 2560, torch.device("cpu"))  # ERNIE-4.5-21B-A3B qkv_proj
    programs = triton.cdiv(3584, t.block_n) * t.split_k
    assert programs >= 2 * 132 and t.split_k <= 16
    assert choose_gemv_tiles(8, 2560, 2560, torch.device("cpu")).block_m == 8
