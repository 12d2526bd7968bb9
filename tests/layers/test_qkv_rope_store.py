"""Who takes the fused qkv + rotary + KV store (ERNIESERVE_FUSED_QKV_ROPE): the attention layer offers
a `RopeKVStore` only for a fusing backend, interleaved rotary and the switch on; the qkv layer's
linear method runs it only where its one-row GEMV would run (bf16, or wint8 / wint4 per channel on
the Triton backend), and otherwise answers None so the decoder projects and rotates as before."""

from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ:
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)", allow_module_level=True)
pytest.importorskip("triton")

from ernieserve.attention.base import AttentionMetadata, RopeKVStore  # noqa: E402
from ernieserve.attention.torch_ref import TorchRefBackend  # noqa: E402
from ernieserve.attention.triton_attn import TritonAttentionBackend  # noqa: E402
from ernieserve.kernels import gemv  # noqa: E402
from ernieserve.kernels.quant_matmul import GemmBackend  # noqa: E402
from ernieserve.layers.attention import Attention  # noqa: E402
from ernieserve.layers.linear import QKVParallelLinear  # noqa: E402
from ernieserve.layers.quantization import WeightOnlyConfig, quantization_scope, scoped_linear_method  # noqa: E402
from ernieserve.layers.rotary import RotaryEmbedding  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 16, 64


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch):
    def set_to(on: bool) -> None:
        monkeypatch.setenv("ERNIESERVE_FUSED_QKV_ROPE", "1" if on else "0")
        gemv.fused_qkv_rope_enabled.cache_clear()

    yield set_to
    gemv.fused_qkv_rope_enabled.cache_clear()


def _meta(slots: torch.Tensor) -> AttentionMetadata:
    one = torch.tensor([0, 1], dtype=torch.int32)
    return AttentionMetadata(num_reqs=1, num_tokens=1, max_query_len=1, max_seq_len=1, query_start_loc=one,
                             seq_lens=one[1:], block_tables=torch.zeros(1, 1, dtype=torch.int32),
                             slot_mapping=slots, query_start_loc_cpu=one, seq_lens_cpu=one[1:], is_decode_only=True)


def _cpu_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """RotaryEmbedding.kernel_tables less its CUDA check."""
    monkeypatch.setattr(RotaryEmbedding, "kernel_tables",
                        lambda self, positions, q=None, k=None: (positions, self.cos, self.sin)
                        if positions.dim() == 1 else None)


def test_attention_offers_a_store_only_where_it_can_fuse(monkeypatch: pytest.MonkeyPatch, switch) -> None:
    caches = torch.zeros(2, 4, 16, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16).unbind(0)
    attn = Attention(HEADS, KV_HEADS, HEAD_DIM, TritonAttentionBackend())
    attn.kv_cache = caches
    ernie = RotaryEmbedding(HEAD_DIM, 64, 10000.0, interleaved=True)
    positions, meta = torch.tensor([5]), _meta(torch.tensor([3]))
    switch(True)
    assert attn.rope_kv_store(ernie, positions, meta) is None, "CPU tensors: kernel_tables says no"
    _cpu_tables(monkeypatch)
    store = attn.rope_kv_store(ernie, positions, meta)
    assert isinstance(store, RopeKVStore)
    assert store.positions is positions and store.cos is ernie.cos and store.k_cache is caches[0]
    assert store.v_cache is caches[1] and store.slot_mapping is meta.slot_mapping
    neox = RotaryEmbedding(HEAD_DIM, 64, 10000.0, interleaved=False)
    assert attn.rope_kv_store(neox, positions, meta) is None, "halves: a pair spans two GEMV programs"
    assert attn.rope_kv_store(ernie, positions.expand(3, 1), meta) is None, "no 1-D tables"
    reference = Attention(HEADS, KV_HEADS, HEAD_DIM, TorchRefBackend())
    reference.kv_cache = caches
    assert reference.rope_kv_store(ernie, positions, meta) is None, "a backend that stores K/V itself"
    switch(False)
    assert attn.rope_kv_store(ernie, positions, meta) is None, "off by default"


def _store(k_cache: torch.Tensor, v_cache: torch.Tensor) -> RopeKVStore:
    rotary = RotaryEmbedding(HEAD_DIM, 64, 10000.0, interleaved=True)
    return RopeKVStore(torch.tensor([9]), rotary.cos, rotary.sin, k_cache, v_cache, torch.tensor([21]))


def test_bf16_qkv_layer_fuses_where_it_takes_the_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemv, "SLICE_BYTES", 4 * HIDDEN * 2)  # programs of 4 rows, within a head
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=True, dtype=torch.bfloat16)
    layer.weight.data.normal_(std=HIDDEN**-0.5)
    layer.bias.data.normal_()
    x = torch.randn(1, HIDDEN).to(torch.bfloat16)
    caches = torch.zeros(2, 2, 16, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    assert layer.forward_rope_store(x, _store(*caches.clone().unbind(0))) is None, "no GEMV on CPU tensors"
    monkeypatch.setattr(gemv, "use_gemv", lambda x, w: x.shape[0] == 1)
    got_caches, want_caches = caches.clone().unbind(0), caches.clone().unbind(0)
    q = layer.forward_rope_store(x, _store(*got_caches))
    want = gemv.gemv_rope_store(x, layer.weight, layer.bias, *_store(*want_caches))
    assert q.shape == (1, HEADS * HEAD_DIM) and torch.equal(q, want)
    assert torch.equal(got_caches[0], want_caches[0]) and torch.equal(got_caches[1], want_caches[1])
    assert got_caches[1].abs().sum() > 0
    assert layer.forward_rope_store(torch.randn(2, HIDDEN).to(torch.bfloat16),
                                    _store(*caches.clone().unbind(0))) is None, "two rows: no GEMV"


@pytest.mark.parametrize("config", [WeightOnlyConfig(8), WeightOnlyConfig(4), WeightOnlyConfig(4, 32)],
                         ids=["wint8", "wint4", "wint4g32"])
def test_weight_only_qkv_layer_fuses_where_it_takes_the_gemv(monkeypatch: pytest.MonkeyPatch, config) -> None:
    with torch.device("cpu"), quantization_scope(config):
        layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=False, dtype=torch.bfloat16,
                                  method=scoped_linear_method())
    for shard, rows in (("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
        layer.weight.weight_loader(layer.weight, torch.randn(rows, HIDDEN).to(torch.bfloat16), shard)
    layer.method.process_weights_after_loading(layer)
    stored = HIDDEN if config.bits == 8 else HIDDEN // 2
    monkeypatch.setattr(gemv, "SLICE_BYTES", 8 * stored)  # programs of 8 rows, within a head
    monkeypatch.setattr(gemv, "use_gemv_quant", lambda x, qw, s, bits: x.shape[0] == 1)
    x = torch.randn(1, HIDDEN).to(torch.bfloat16)
    caches = torch.zeros(2, 2, 16, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    assert layer.quant_backend is GemmBackend.REFERENCE  # CPU: the reference GEMM, no GEMV
    assert layer.forward_rope_store(x, _store(*caches.clone().unbind(0))) is None
    layer.quant_backend = GemmBackend.TRITON  # as resolved on CUDA
    got_caches, want_caches = caches.clone().unbind(0), caches.clone().unbind(0)
    q = layer.forward_rope_store(x, _store(*got_caches))
    if config.group_size:
        assert q is None, "group-wise scales stay on the GEMM"
        return
    want = gemv.gemv_quant_rope_store(x, layer.qweight, layer.weight_scale, config.bits, None, *_store(*want_caches))
    assert torch.equal(q, want)
    assert torch.equal(got_caches[0], want_caches[0]) and torch.equal(got_caches[1], want_caches[1])
