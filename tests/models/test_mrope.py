"""ERNIE 4.5 VL's 3-D rotary (`layers/mrope.py`) against HF's `Ernie4_5_VLMoeTextRotaryEmbedding`.

At the real head size (128, mrope_section [22, 22, 20]) with t, h, w rows that all differ, so a
pair driven by the wrong row, or a wrong frequency, shows.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton rotary kernel runs in its interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ernieserve.layers.mrope import ErnieMRotaryEmbedding, mrope_pair_axes  # noqa: E402
from ernieserve.layers.rotary import RotaryEmbedding  # noqa: E402

HEAD_DIM, SECTION, THETA, MAX_POS = 128, [22, 22, 20], 500000.0, 4096


def _hf_rotate(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import Ernie4_5_VLMoeTextConfig
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeTextRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    cfg = Ernie4_5_VLMoeTextConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2, num_key_value_heads=1,
                                   rope_parameters={"rope_type": "default", "rope_theta": THETA,
                                                    "mrope_section": SECTION})
    rope = Ernie4_5_VLMoeTextRotaryEmbedding(cfg)
    cos, sin = rope(q, positions[:, None, :])  # [3, 1, T] -> [1, T, D] each
    # HF's q/k are [batch, heads, T, D]
    qh, kh = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return qh[0].transpose(0, 1), kh[0].transpose(0, 1)


def _inputs(num_tokens: int = 37) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 3000, (3, num_tokens), generator=gen)  # t, h, w rows all different
    q = torch.randn(num_tokens, 4, HEAD_DIM, generator=gen)
    k = torch.randn(num_tokens, 2, HEAD_DIM, generator=gen)
    return positions, q, k


def test_matches_hf_3d_rotary() -> None:
    positions, q, k = _inputs()
    rope = ErnieMRotaryEmbedding(HEAD_DIM, MAX_POS, THETA, SECTION)
    got_q, got_k = rope.forward_torch(positions, q, k)
    ref_q, ref_k = _hf_rotate(q, k, positions)
    torch.testing.assert_close(got_q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, ref_k, atol=1e-5, rtol=1e-5)


def test_equal_rows_are_the_1d_interleaved_rotary() -> None:
    """Text and generated tokens: exactly ERNIE 4.5's plain rotary."""
    positions, q, k = _inputs()
    same = positions[:1].expand(3, -1)
    got = ErnieMRotaryEmbedding(HEAD_DIM, MAX_POS, THETA, SECTION).forward_torch(same, q, k)
    ref = RotaryEmbedding(HEAD_DIM, MAX_POS, THETA, interleaved=True).forward_torch(same[0], q, k)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_per_token_tables_through_the_triton_kernel() -> None:
    """The CUDA path hands the kernel per-token tables indexed by row number; same result."""
    from ernieserve.kernels.rotary import apply_rotary_

    positions, q, k = _inputs()
    rope = ErnieMRotaryEmbedding(HEAD_DIM, MAX_POS, THETA, SECTION)
    cos, sin = rope.token_tables(positions)
    got_q, got_k = apply_rotary_(torch.arange(q.shape[0]), q.clone(), k.clone(), cos, sin, True)
    ref_q, ref_k = rope.forward_torch(positions, q, k)
    torch.testing.assert_close(got_q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, ref_k, atol=1e-5, rtol=1e-5)


def test_pair_axes_and_bad_sections() -> None:
    axes = mrope_pair_axes(16, [3, 3, 2]).tolist()
    assert axes == [1, 2, 1, 2, 1, 2, 0, 0]  # h, w alternate over the first 6 pairs; t for the last 2
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_pair_axes(16, [3, 3, 3])
    with pytest.raises(ValueError, match="height and width"):
        mrope_pair_axes(16, [4, 2, 2])
    with pytest.raises(ValueError, match=r"\[3, num_tokens\]"):
        ErnieMRotaryEmbedding(16, 64, 10000.0, [3, 3, 2]).token_tables(torch.zeros(5, dtype=torch.long))
