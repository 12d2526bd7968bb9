"""A rank's weights: memory-mapped checkpoint views, and slices that add up to the one-rank model."""

from __future__ import annotations

import pytest
import torch

from ernieserve.distributed.parallel_state import TPGroup
from ernieserve.distributed.sharded_loading import CheckpointFormatError, iterate_checkpoint_mapped
from ernieserve.layers.embedding import ParallelLMHead
from ernieserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ernieserve.models.loader import checkpoint_files, iterate_checkpoint


def test_mapped_views_equal_safetensors(checkpoint_factory):
    files = checkpoint_files(checkpoint_factory("tiny-ernie-4.5-moe"))
    reference = dict(iterate_checkpoint(files, progress=False))
    mapped = dict(iterate_checkpoint_mapped(files))
    assert mapped.keys() == reference.keys()
    for name, tensor in reference.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor), name
    # views of one mapping, not copies: each tensor sits at its file offset from the others
    first = list(iterate_checkpoint_mapped(files[:1]))
    ptrs = sorted(t.data_ptr() for _, t in first if t.numel())
    assert ptrs[-1] - ptrs[0] < files[0].stat().st_size


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CheckpointFormatError, match="model.safetensors: the safetensors header is not valid JSON"):
        list(iterate_checkpoint_mapped([bad]))


def _slices(make, full: torch.Tensor, shard_ids: list, size: int) -> list[torch.Tensor]:
    """Each rank's weight after loading `full` (split into shard_ids pieces along dim 0)."""
    out = []
    for rank in range(size):
        layer = make(TPGroup(rank, size))
        pieces = full.split([len(p) for p in shard_ids[1]], dim=0) if shard_ids[1] else [full]
        for sid, piece in zip(shard_ids[0], pieces):
            layer.weight.weight_loader(layer.weight, piece, sid)
        out.append(layer.weight.data.clone())
    return out


def test_qkv_slices_with_replicated_kv_heads():
    # 8 query heads, 2 KV heads, 4 ranks: ranks 0-1 share KV head 0, ranks 2-3 KV head 1
    head_dim, hidden = 4, 8
    q, k, v = (torch.randn(n * head_dim, hidden) for n in (8, 2, 2))
    for rank in range(4):
        layer = QKVParallelLinear(hidden, head_dim, 8, 2, tp=TPGroup(rank, 4))
        for sid, part in zip("qkv", (q, k, v)):
            layer.weight.weight_loader(layer.weight, part, sid)
        got_q, got_k, got_v = layer.weight.data.split([2 * head_dim, head_dim, head_dim])
        assert torch.equal(got_q, q[rank * 2 * head_dim:(rank + 1) * 2 * head_dim])
        kv_head = rank // 2
        assert torch.equal(got_k, k[kv_head * head_dim:(kv_head + 1) * head_dim])
        assert torch.equal(got_v, v[kv_head * head_dim:(kv_head + 1) * head_dim])
    with pytest.raises(ValueError, match="not a multiple of the key/value heads"):
        QKVParallelLinear(hidden, head_dim, 12, 4, tp=TPGroup(0, 6))


def test_column_row_and_vocab_slices_reassemble():
    gate, up = torch.randn(12, 6), torch.randn(12, 6)
    parts = [MergedColumnParallelLinear(6, [12, 12], tp=TPGroup(r, 3)) for r in range(3)]
    for layer in parts:
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)
    assert torch.equal(torch.cat([p.weight[:4] for p in parts]), gate)
    assert torch.equal(torch.cat([p.weight[4:] for p in parts]), up)
    down = torch.randn(6, 12)
    rows = [RowParallelLinear(12, 6, tp=TPGroup(r, 3)) for r in range(3)]
    for layer in rows:
        layer.weight.weight_loader(layer.weight, down, None)
    assert torch.equal(torch.cat([r.weight for r in rows], dim=1), down)
    # a vocabulary of 10 over 4 ranks: shards of 3, the last padded with zero rows
    emb = torch.randn(10, 5)
    heads = [ParallelLMHead(10, 5, torch.float32, TPGroup(r, 4)) for r in range(4)]
    for h in heads:
        h.weight.weight_loader(h.weight, emb)
    assert torch.equal(torch.cat([h.weight for h in heads])[:10], emb)
    assert not heads[-1].weight[1:].any()
