"""Triton paged-attention kernels vs the torch oracle, on CPU through the Triton interpreter.

Shapes are tiny (the interpreter runs each program in numpy) but chosen to hit every edge: shuffled
non-contiguous block ids, cached context + new chunk, q_len 1 and > 1, several query tiles per
request, key tiles that straddle cache blocks, lengths that are not multiples of the block size,
GQA 1/2/4/8, head_dim 64/128 and non-powers of two, decode splits that end up empty.
"""

from __future__ import annotations

import dataclasses


import pytest
import torch

from interpreter import interpreted as _interpreted, require_interpreter  # noqa: E402 (tests/kernels)

triton = require_interpreter()

from ernieserve.attention import triton_attn
from ernieserve.attention.base import AttentionMetadata
from ernieserve.attention.torch_ref import TorchRefBackend, paged_attention_ref, store_kv
from ernieserve.kernels import paged_attention as pa

assert _interpreted(pa._unified_attention_kernel), "kernels imported before TRITON_INTERPRET was set"

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def make_step(
    ctx_lens: list[int],
    q_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    spare_blocks: int = 3,
    seed: int = 0,
):
    """Caches holding each request's first ctx_len tokens, plus this step's new q/k/v and metadata.

    Blocks are handed out from a shuffled pool, so block tables are non-contiguous and unordered.
    """
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + spare_blocks
    pool = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(blocks_per_req) + 1
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for i, n in enumerate(blocks_per_req):
        block_tables[i, :n] = torch.tensor([pool.pop() for _ in range(n)], dtype=torch.int32)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    k_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    slots = []
    for i, (c, s) in enumerate(zip(ctx_lens, seq_lens)):
        slots += [int(block_tables[i, p // block_size]) * block_size + p % block_size for p in range(c, s)]
    num_tokens = sum(q_lens)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    meta = AttentionMetadata(
        num_reqs=len(seq_lens), num_tokens=num_tokens, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc=qsl, seq_lens=lens, block_tables=block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc_cpu=qsl.clone(), seq_lens_cpu=lens.clone(),
        is_decode_only=all(q == 1 for q in q_lens),
    )
    q = rand(num_tokens, num_heads, head_dim)
    k = rand(num_tokens, num_kv_heads, head_dim)
    v = rand(num_tokens, num_kv_heads, head_dim)
    return q, k, v, (k_cache, v_cache), meta


# --------------------------------------------------------------------------------------------- store


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_reference_and_skips_padding(dtype: torch.dtype) -> None:
    q, k, v, cache, meta = make_step([5, 0, 17], [3, 20, 1], 4, 2, 64, 16, dtype)
    # two padding rows at the end (slot -1) plus one in the middle; K/V as strided column slices
    slots = torch.cat([meta.slot_mapping, torch.tensor([-1, -1])])
    slots[4] = -1
    kv = torch.cat([k, v], dim=1)
    kv = torch.cat([kv, torch.full((2, *kv.shape[1:]), 7.0, dtype=dtype)])
    k, v = kv[:, :2], kv[:, 2:]
    ref = tuple(c.clone() for c in cache)
    store_kv(k, v, ref, slots)
    pa.store_kv_triton(k, v, cache[0], cache[1], slots)
    assert torch.equal(cache[0], ref[0]) and torch.equal(cache[1], ref[1])


# ------------------------------------------------------------------------------------------- unified


UNIFIED_CASES = [
    # heads, kv heads, head_dim, block_size, dtype, block_m, block_n
    (2, 2, 64, 16, torch.float32, 16, 16),  # MHA, several q tiles per request
    (4, 2, 64, 64, torch.float32, 16, 16),  # GQA 2, key tiles inside one big block
    (8, 2, 128, 16, torch.float32, 32, 32),  # GQA 4 (ERNIE-0.3B ratio is 8: see the decode cases)
    (4, 1, 96, 16, torch.float32, 16, 16),  # non-power-of-2 head_dim
    (4, 2, 64, 16, torch.bfloat16, None, None),  # launcher defaults
    (8, 1, 80, 64, torch.float16, 16, 32),  # GQA 8, head_dim 80
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,dtype,block_m,block_n", UNIFIED_CASES)
def test_unified_attention_mixed_batch(heads, kv_heads, head_dim, block_size, dtype, block_m, block_n) -> None:
    # decode rows, a fresh prefill, chunks on top of cached context, lengths off block boundaries
    ctx_lens = [0, 13, 40, 70, 0]
    q_lens = [9, 1, 19, 2, 1]
    q, k, v, cache, meta = make_step(ctx_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype)
    store_kv(k, v, cache, meta.slot_mapping)
    ref = paged_attention_ref(q, cache, meta, head_dim**-0.5)
    out = pa.paged_attention_unified(
        q, cache[0], cache[1], meta.query_start_loc, meta.seq_lens, meta.block_tables, head_dim**-0.5,
        block_m=block_m, block_n=block_n,
    )
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def test_unified_attention_skips_empty_requests_and_padding_rows() -> None:
    # a request with no new tokens in the middle, and padded query rows no request owns
    q, k, v, cache, meta = make_step([4, 30, 3], [6, 0, 17], 4, 2, 64, 16, torch.float32)
    store_kv(k, v, cache, meta.slot_mapping)
    ref = paged_attention_ref(q, cache, meta, 0.125)
    padded_q = torch.cat([q, torch.randn(5, 4, 64)])
    out = torch.full_like(padded_q, 3.0)
    pa.paged_attention_unified(
        padded_q, cache[0], cache[1], meta.query_start_loc, meta.seq_lens, meta.block_tables, 0.125,
        out=out, block_m=16, block_n=16,
    )
    torch.testing.assert_close(out[: meta.num_tokens], ref, **TOL[torch.float32])
    assert torch.all(out[meta.num_tokens :] == 3.0)


# -------------------------------------------------------------------------------------------- decode


DECODE_CASES = [
    # heads, kv heads, head_dim, block_size, dtype, num_splits
    (2, 2, 64, 16, torch.float32, 1),
    (4, 2, 64, 16, torch.float32, 3),  # non-power-of-2 split count still reduces correctly
    (8, 2, 128, 64, torch.float32, 4),
    (16, 2, 128, 64, torch.bfloat16, 8),  # ERNIE-4.5-0.3B head layout, many empty splits
    (4, 1, 96, 16, torch.float16, 2),
    (4, 2, 64, 16, torch.float32, 64),  # a graph's split count: 1..10 used per request, the rest idle
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,dtype,num_splits", DECODE_CASES)
def test_decode_split_k(heads, kv_heads, head_dim, block_size, dtype, num_splits) -> None:
    ctx_lens = [0, 16, 37, 150]  # seq lens 1, 17, 38, 151
    q, k, v, cache, meta = make_step(ctx_lens, [1] * 4, heads, kv_heads, head_dim, block_size, dtype)
    store_kv(k, v, cache, meta.slot_mapping)
    ref = paged_attention_ref(q, cache, meta, head_dim**-0.5)
    out = pa.paged_attention_decode(
        q, cache[0], cache[1], meta.seq_lens, meta.block_tables, head_dim**-0.5, num_splits, block_n=16,
    )
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    # the last split of each (request, kv head) combined them and put its counter back for the next launch
    from ernieserve.kernels import split_k

    assert not split_k.tile_counters(q.device).any()
    again = pa.paged_attention_decode(
        q, cache[0], cache[1], meta.seq_lens, meta.block_tables, head_dim**-0.5, num_splits, block_n=16,
    )
    assert torch.equal(again, out)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,dtype,num_splits", DECODE_CASES[1:5])
@pytest.mark.parametrize("tiles", [
    pa.DecodeTiles(block_n=16, early=True),
    pa.DecodeTiles(block_n=32, early=True, warps=2, stages=1),
    pa.DecodeTiles(block_n=32, stages=1, min_keys=32),
    pa.DecodeTiles(block_n=16),
], ids=["early", "early-2warps", "32keys", "throughput"])
def test_decode_tile_variants(heads, kv_heads, head_dim, block_size, dtype, num_splits, tiles) -> None:
    """ERNIESERVE_DECODE_ATTN's variants against the reference: EARLY (the first tile of earlier
    steps' keys and values read before the PDL wait, the newest key after it, merged in registers)
    gives the bits of the same tiles read after the wait. Contexts end inside, at the edge of and past the first tile; a padded
    request; splits left unused."""
    ctx_lens = [0, 15, 16, 37, 150]  # seq lens 1, 16, 17, 38, 151
    q, k, v, cache, meta = make_step(ctx_lens, [1] * 5, heads, kv_heads, head_dim, block_size, dtype)
    store_kv(k, v, cache, meta.slot_mapping)
    seq_lens = torch.cat([meta.seq_lens, torch.zeros(1, dtype=torch.int32)])  # + a padded request
    tables = torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables[:1])])
    q6 = torch.cat([q, torch.randn(1, heads, head_dim).to(dtype)])
    out = pa.paged_attention_decode(q6, cache[0], cache[1], seq_lens, tables, head_dim**-0.5, num_splits,
                                    tiles=tiles)
    ref = paged_attention_ref(q, cache, meta, head_dim**-0.5)
    torch.testing.assert_close(out[:5].float(), ref.float(), **TOL[dtype])
    assert torch.all(out[5] == 0)
    late = pa.paged_attention_decode(q6, cache[0], cache[1], seq_lens, tables, head_dim**-0.5, num_splits,
                                     tiles=dataclasses.replace(tiles, early=False))
    assert torch.equal(out, late)


def test_decode_tiles_policy_and_environment(monkeypatch) -> None:
    monkeypatch.delenv(pa.DECODE_TILES_ENV, raising=False)
    pa.env_decode_tiles.cache_clear()
    # up to LATENCY_PAIRS (request, KV head) pairs the latency tiles, beyond them the throughput ones
    assert pa.decode_tiles(16, 4, 128) == pa.DecodeTiles(block_n=64, stages=1, early=True)
    assert pa.decode_tiles(17, 4, 128) == pa.DecodeTiles(block_n=128, stages=3, early=False)
    assert pa.decode_tiles(1, 4, 256).block_n == 32 and pa.decode_tiles(64, 4, 256).block_n == 64
    monkeypatch.setenv(pa.DECODE_TILES_ENV, "block_n=32, early=yes,min_keys=64")
    pa.env_decode_tiles.cache_clear()
    try:
        forced = pa.DecodeTiles(block_n=32, early=True, min_keys=64)
        assert pa.decode_tiles(1, 4, 128) == forced and pa.decode_tiles(64, 4, 128) == forced
        assert pa.choose_num_splits(1, 4, 1024, 132) == 16  # 1024 / 64 keys
        monkeypatch.setenv(pa.DECODE_TILES_ENV, "blocks=3")
        pa.env_decode_tiles.cache_clear()
        with pytest.raises(ValueError, match="ERNIESERVE_DECODE_ATTN: 'blocks=3'"):
            pa.env_decode_tiles()
    finally:
        monkeypatch.delenv(pa.DECODE_TILES_ENV)
        pa.env_decode_tiles.cache_clear()
    assert pa.env_decode_tiles() is None and pa.choose_num_splits(1, 4, 1024, 132) == 8


def test_decode_padded_request_gives_zeros_and_uses_given_scratch() -> None:
    q, k, v, cache, meta = make_step([20, 45], [1, 1], 4, 2, 64, 16, torch.float32)
    store_kv(k, v, cache, meta.slot_mapping)
    ref = paged_attention_ref(q, cache, meta, 0.125)
    # a third, padded request (seq_len 0) as in a CUDA-graph batch padded to 3
    seq_lens = torch.tensor([21, 46, 0], dtype=torch.int32)
    block_tables = torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables[:1])])
    q3 = torch.cat([q, torch.randn(1, 4, 64)])
    scratch = torch.full((3 * 4 * 4 * 65,), float("nan"))  # stale contents must not leak
    out = pa.paged_attention_decode(q3, cache[0], cache[1], seq_lens, block_tables, 0.125, 4, scratch=scratch)
    torch.testing.assert_close(out[:2], ref, **TOL[torch.float32])
    assert torch.all(out[2] == 0)


def test_choose_num_splits_policy() -> None:
    # long context, small batch: split up to the cap; big batch or short context: no split
    assert pa.choose_num_splits(1, 2, 8192, 132) == pa.MAX_DECODE_SPLITS
    assert pa.choose_num_splits(256, 2, 8192, 132) == 1
    assert pa.choose_num_splits(1, 2, 100, 132) == 1
    assert pa.choose_num_splits(4, 2, 1024, 132) == 8  # limited by keys per split
    for b in range(1, 300, 7):
        s = pa.choose_num_splits(b, 2, 1 << 20, 132)
        assert s & (s - 1) == 0 and b * s <= pa.decode_scratch_rows(300, 2, 132)


# ------------------------------------------------------------------------------------------- backend


@pytest.mark.parametrize("decode", [False, True])
def test_backend_matches_torch_backend(decode: bool) -> None:
    ctx_lens, q_lens = ([3, 300, 200], [1, 1, 1]) if decode else ([0, 50, 7], [12, 1, 4])
    q, k, v, cache, meta = make_step(ctx_lens, q_lens, 8, 2, 64, 16, torch.float32)
    ref_cache = tuple(c.clone() for c in cache)
    ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, 0.125)
    backend = triton_attn.TritonAttentionBackend(num_heads=8, num_kv_heads=2, head_dim=64)
    assert backend.name == "triton" and backend.supports_cuda_graph()
    backend.init_cuda_graph_state(max_num_reqs=4, max_blocks_per_req=meta.block_tables.shape[1],
                                  device=torch.device("cpu"))
    scratch = backend._scratch
    out = backend.forward(q, k, v, cache, meta, 0.125)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert torch.equal(cache[0], ref_cache[0]) and torch.equal(cache[1], ref_cache[1])
    assert backend._scratch is scratch  # the persistent scratch served the step


def test_backend_zeroes_rows_beyond_the_batch() -> None:
    q, k, v, cache, meta = make_step([10, 33], [1, 1], 4, 2, 64, 16, torch.float32)
    ref = TorchRefBackend().forward(q, k, v, tuple(c.clone() for c in cache), meta, 0.125)
    pad = lambda t, fill: torch.cat([t, torch.full((2, *t.shape[1:]), fill, dtype=t.dtype)])  # noqa: E731
    meta.slot_mapping = pad(meta.slot_mapping, -1)
    out = triton_attn.TritonAttentionBackend().forward(pad(q, 1.0), pad(k, 1.0), pad(v, 1.0), cache, meta, 0.125)
    torch.testing.assert_close(out[:2], ref, **TOL[torch.float32])
    assert torch.all(out[2:] == 0)
