"""Triton paged attention vs the torch oracle at real shapes, and CUDA-graph capture of decode.

Shapes follow ERNIE-4.5-0.3B: 16 query heads, 2 KV heads (GQA 8), head_dim 128, block_size 64.
Run on the GPU machine with `pytest -m gpu tests/gpu/test_paged_attention_gpu.py` and without
TRITON_INTERPRET set.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    # skip before importing triton: on CPU machines the interpreted kernel tests set it up
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytest.importorskip("triton")

from ernieserve.attention.base import AttentionMetadata  # noqa: E402
from ernieserve.attention.torch_ref import TorchRefBackend, paged_attention_ref, store_kv  # noqa: E402
from ernieserve.attention.triton_attn import TritonAttentionBackend  # noqa: E402
from ernieserve.kernels import paged_attention as pa  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 2, 128, 64
SCALE = HEAD_DIM**-0.5
DEV = torch.device("cuda")
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def make_step(
    ctx_lens: list[int],
    q_lens: list[int],
    dtype: torch.dtype = torch.bfloat16,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    head_dim: int = HEAD_DIM,
    block_size: int = BLOCK_SIZE,
    seed: int = 0,
    reserve: int = 0,
):
    """Shuffled-block caches holding each request's context, this step's q/k/v and its metadata.

    `reserve` extra tokens per request get blocks too, for tests that run a further step.
    """
    g = torch.Generator(device=DEV).manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    blocks_per_req = [-(-(s + reserve) // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 8
    pool = torch.randperm(num_blocks, device=DEV, generator=g).to(torch.int32)
    max_blocks = max(blocks_per_req) + 2
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32, device=DEV)
    taken = 0
    for i, n in enumerate(blocks_per_req):
        block_tables[i, :n] = pool[taken : taken + n]
        taken += n
    # slot of every new token: position p of request i -> block_tables[i, p // bs] * bs + p % bs
    req = torch.repeat_interleave(torch.arange(len(q_lens), device=DEV), torch.tensor(q_lens, device=DEV))
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    pos = torch.arange(sum(q_lens), device=DEV) - qsl[req] + torch.tensor(ctx_lens, device=DEV)[req]
    slots = block_tables[req, pos // block_size].long() * block_size + pos % block_size
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    meta = AttentionMetadata(
        num_reqs=len(seq_lens), num_tokens=sum(q_lens), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc=qsl, seq_lens=lens, block_tables=block_tables, slot_mapping=slots,
        query_start_loc_cpu=qsl.cpu(), seq_lens_cpu=lens.cpu(), is_decode_only=all(q == 1 for q in q_lens),
    )

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEV, generator=g).to(dtype)

    cache = (rand(num_blocks, block_size, kv_heads, head_dim), rand(num_blocks, block_size, kv_heads, head_dim))
    n = meta.num_tokens
    return rand(n, heads, head_dim), rand(n, kv_heads, head_dim), rand(n, kv_heads, head_dim), cache, meta


def test_store_kv_real_shape() -> None:
    q, k, v, cache, meta = make_step([0, 3000, 100], [4096, 512, 1])
    meta.slot_mapping[::7] = -1
    ref = tuple(c.clone() for c in cache)
    store_kv(k, v, ref, meta.slot_mapping)
    pa.store_kv_triton(k, v, cache[0], cache[1], meta.slot_mapping)
    assert torch.equal(cache[0], ref[0]) and torch.equal(cache[1], ref[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unified_mixed_batch(dtype: torch.dtype) -> None:
    # long prefill, chunk on long context, decodes at 8k, a short odd chunk
    ctx_lens = [0, 4000, 8191, 5000, 100, 63]
    q_lens = [2048, 512, 1, 1, 37, 1]
    q, k, v, cache, meta = make_step(ctx_lens, q_lens, dtype)
    store_kv(k, v, cache, meta.slot_mapping)
    ref = paged_attention_ref(q, cache, meta, SCALE)
    out = pa.paged_attention_unified(q, cache[0], cache[1], meta.query_start_loc, meta.seq_lens,
                                     meta.block_tables, SCALE)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(16, 16, 64, 16), (32, 8, 128, 16), (12, 4, 96, 64)])
def test_unified_other_layouts(heads: int, kv_heads: int, head_dim: int, block_size: int) -> None:
    q, k, v, cache, meta = make_step([0, 700, 33], [300, 129, 1], torch.bfloat16, heads, kv_heads, head_dim,
                                     block_size)
    store_kv(k, v, cache, meta.slot_mapping)
    ref = paged_attention_ref(q, cache, meta, head_dim**-0.5)
    out = pa.paged_attention_unified(q, cache[0], cache[1], meta.query_start_loc, meta.seq_lens,
                                     meta.block_tables, head_dim**-0.5)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


@pytest.mark.parametrize("num_splits", [1, 4, 16, 64])
@pytest.mark.parametrize("tiles", ["policy", "throughput"])
def test_decode_long_context_splits(num_splits: int, tiles: str) -> None:
    """The policy's latency tiles at this batch (64 keys, the first tile before the PDL wait) and
    the throughput tiles (128 keys, three stages) against the reference."""
    q, k, v, cache, meta = make_step([8191, 4000, 1, 777], [1, 1, 1, 1])
    store_kv(k, v, cache, meta.slot_mapping)
    ref = paged_attention_ref(q, cache, meta, SCALE)
    chosen = None if tiles == "policy" else pa.DecodeTiles()
    out = pa.paged_attention_decode(q, cache[0], cache[1], meta.seq_lens, meta.block_tables, SCALE, num_splits,
                                    tiles=chosen)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


def test_decode_batch_256_through_backend() -> None:
    ctx_lens = torch.randint(1, 8192, (256,), generator=torch.Generator().manual_seed(1)).tolist()
    q, k, v, cache, meta = make_step(ctx_lens, [1] * 256)
    ref_cache = tuple(c.clone() for c in cache)
    ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, SCALE)
    out = TritonAttentionBackend().forward(q, k, v, cache, meta, SCALE)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
    assert torch.equal(cache[0], ref_cache[0]) and torch.equal(cache[1], ref_cache[1])


def test_mixed_batch_through_backend() -> None:
    q, k, v, cache, meta = make_step([0, 1000, 6000], [1000, 64, 1])
    ref_cache = tuple(c.clone() for c in cache)
    ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, SCALE)
    out = TritonAttentionBackend().forward(q, k, v, cache, meta, SCALE)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


@pytest.mark.parametrize("batch,max_len", [(4, 8192), (64, 2048)])
def test_decode_cuda_graph_replay_is_bit_identical(batch: int, max_len: int) -> None:
    """Capture one decode step, feed it new inputs in place, replay: same bits as an eager step."""
    gen = torch.Generator().manual_seed(2)
    ctx0 = torch.randint(1, max_len - 8, (batch,), generator=gen).tolist()
    # step 0 builds the persistent buffers; step 1 is one token later for every request
    q0, k0, v0, cache, meta = make_step(ctx0, [1] * batch, seed=3, reserve=1)
    q1, k1, v1 = make_step(ctx0, [1] * batch, seed=4)[:3]
    # step 1 must address the same blocks: take its slots and lengths from step 0's block tables
    pos = meta.seq_lens.long()  # the new token of step 1 sits at position seq_len0
    blocks1 = meta.block_tables[torch.arange(batch, device=DEV), pos // BLOCK_SIZE].long()
    slots1 = blocks1 * BLOCK_SIZE + pos % BLOCK_SIZE

    backend = TritonAttentionBackend(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    backend.init_cuda_graph_state(max_num_reqs=batch, max_blocks_per_req=meta.block_tables.shape[1], device=DEV)
    meta.max_seq_len = max_len  # the runner captures with the model's max length
    for _ in range(2):  # warm-up: compiles the kernels outside the capture
        backend.forward(q0, k0, v0, cache, meta, SCALE)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = backend.forward(q0, k0, v0, cache, meta, SCALE)

    # new step's inputs, written in place into the captured buffers
    q0.copy_(q1)
    k0.copy_(k1)
    v0.copy_(v1)
    meta.seq_lens.add_(1)
    meta.slot_mapping.copy_(slots1)
    eager_cache = tuple(c.clone() for c in cache)
    graph.replay()
    eager_out = backend.forward(q0, k0, v0, eager_cache, meta, SCALE)
    torch.cuda.synchronize()
    assert torch.equal(graph_out, eager_out)
    assert torch.equal(cache[0], eager_cache[0]) and torch.equal(cache[1], eager_cache[1])
    # and the replayed step is right, not merely repeatable
    meta.seq_lens_cpu = meta.seq_lens.cpu()
    ref = paged_attention_ref(q0, cache, meta, SCALE)
    torch.testing.assert_close(graph_out, ref, **TOL[torch.bfloat16])


def test_decode_cuda_graph_padded_batch() -> None:
    """A batch of 5 padded to a graph size of 8: padded requests have seq_len 0 and slot -1."""
    q, k, v, cache, meta = make_step([100, 2000, 50, 4096, 7, 0, 0, 0], [1] * 8)
    meta.seq_lens[5:] = 0
    meta.slot_mapping[5:] = -1
    meta.seq_lens_cpu = meta.seq_lens.cpu()
    backend = TritonAttentionBackend(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    backend.init_cuda_graph_state(max_num_reqs=8, max_blocks_per_req=meta.block_tables.shape[1], device=DEV)
    backend.forward(q, k, v, tuple(c.clone() for c in cache), meta, SCALE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, cache, meta, SCALE)
    graph.replay()
    torch.cuda.synchronize()
    ref_meta = make_step([100, 2000, 50, 4096, 7], [1] * 5)[4]
    ref_meta.block_tables = meta.block_tables[:5]
    ref = paged_attention_ref(q[:5], cache, ref_meta, SCALE)
    torch.testing.assert_close(out[:5], ref, **TOL[torch.bfloat16])
    assert torch.all(out[5:] == 0)
