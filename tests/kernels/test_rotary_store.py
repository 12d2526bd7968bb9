"""Rotary + KV store in one kernel against the layers' torch rotary and the reference store.

CPU through the Triton interpreter at tiny shapes: q, k and v as strided views of one fused qkv
projection (as the decoder passes them), both rotary layouts, GQA, head dims whose half is not a
power of two, padding rows (slot -1) and tokens landing in several cache blocks.
"""

from __future__ import annotations


import pytest
import torch

from interpreter import require_interpreter  # noqa: E402 (tests/kernels)

triton = require_interpreter()

from ernieserve.attention.torch_ref import store_kv  # noqa: E402
from ernieserve.kernels.rotary import apply_rotary_and_store_kv_  # noqa: E402
from ernieserve.layers.rotary import RotaryEmbedding  # noqa: E402


@pytest.mark.parametrize("interleaved", [True, False], ids=["ernie-pairs", "neox-halves"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (6, 3, 12), (2, 1, 8)])
def test_rotary_and_store_match_the_two_steps(interleaved, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    tokens, block_size, num_blocks = 9, 4, 8
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, interleaved=interleaved)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split([q_size, kv_size, kv_size], dim=-1))
    positions = torch.randint(0, 64, (tokens,), generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[[2, 7]] = -1  # padding rows: rotated q, nothing stored
    shape = (num_blocks, block_size, kv_heads, head_dim)
    ref_k_cache, ref_v_cache = torch.zeros(shape), torch.zeros(shape)
    ref_q, ref_k = rotary.forward_torch(positions, q.clone(), k.clone())
    store_kv(ref_k, v, (ref_k_cache, ref_v_cache), slots)

    k_before, v_before = k.clone(), v.clone()
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    apply_rotary_and_store_kv_(positions, q, k, v, rotary.cos, rotary.sin, interleaved, k_cache, v_cache, slots)
    torch.testing.assert_close(q, ref_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_cache, ref_k_cache, atol=1e-6, rtol=1e-6)
    assert torch.equal(v_cache, ref_v_cache)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)  # the cache, not k, gets the rotation
