"""The qkv GEMV with the rotary + KV store epilogue (kernels/gemv.py `gemv_rope_store`,
`gemv_quant_rope_store`; ERNIESERVE_FUSED_QKV_ROPE) on the GPU, with PDL on: the same bits as the
unfused decode path (`gemv` / `gemv_quant`, then `apply_rotary_and_store_kv_`) for q and the whole KV
cache, at ERNIE-4.5-21B-A3B's shape (hidden 2560, 20 heads, 4 KV heads, head_dim 128), 0.3B's (hidden
1024, 16 heads, 2 KV heads, head_dim 128) and a head_dim-64 variant, bf16 / wint8 / wint4 weights,
eager and inside replayed CUDA graphs; and the decoder's attention block fused vs unfused.

Run: `pytest -m gpu tests/gpu/test_qkv_rope_gpu.py`. The end-to-end A/B is the decode benchmark with
ERNIESERVE_FUSED_QKV_ROPE=1 against =0.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from ernieserve.attention.base import AttentionMetadata  # noqa: E402
from ernieserve.attention.triton_attn import TritonAttentionBackend  # noqa: E402
from ernieserve.distributed.parallel_state import SINGLE  # noqa: E402
from ernieserve.kernels import gemv, pdl  # noqa: E402
from ernieserve.kernels import quant_matmul as qm  # noqa: E402
from ernieserve.kernels.rotary import apply_rotary_and_store_kv_  # noqa: E402
from ernieserve.layers.quantization import WeightOnlyConfig, quantization_scope  # noqa: E402
from ernieserve.layers.rotary import RotaryEmbedding  # noqa: E402
from ernieserve.models.decoder import DecoderAttention, DecoderSpec  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16
SHAPES = {"21b": (2560, 20, 4, 128), "03b": (1024, 16, 2, 128), "03b-hd64": (1024, 16, 2, 64)}
WEIGHTS = [("bf16", False), ("bf16", True), ("int8", False), ("int4", False), ("int4", True)]
MAX_POS = 131072  # ERNIE's max_position_embeddings
BLOCK_SIZE, NUM_BLOCKS = 64, 16
# (position, slot) of a decode token: table rows from first to last, slots in several blocks, padding
STEPS = [(0, 5), (1, 64), (4095, 130), (100000, -1), (MAX_POS - 1, NUM_BLOCKS * BLOCK_SIZE - 1)]


@pytest.fixture(scope="module")
def rotaries() -> dict[int, RotaryEmbedding]:
    return {hd: RotaryEmbedding(hd, MAX_POS, 500000.0, interleaved=True).to(DEV) for hd in (64, 128)}


class Projection:
    """One qkv weight at a shape, as the plain GEMV and as the fused one."""

    def __init__(self, shape: str, weights: str, bias: bool, rotary: RotaryEmbedding) -> None:
        self.hidden, self.heads, self.kv_heads, self.head_dim = SHAPES[shape]
        n = (self.heads + 2 * self.kv_heads) * self.head_dim
        g = torch.Generator(device=DEV).manual_seed(n + self.hidden + len(weights) + bias)
        w = torch.randn(n, self.hidden, device=DEV, generator=g) * self.hidden**-0.5
        self.bias = torch.randn(n, device=DEV, generator=g).to(BF16) if bias else None
        self.rotary = rotary
        self.weights = weights
        if weights == "bf16":
            self.w = w.to(BF16)
        else:
            self.bits = 8 if weights == "int8" else 4
            self.qweight, self.scales = (qm.quantize_int8 if self.bits == 8 else qm.quantize_int4)(w, 0)
        self.cache = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, self.kv_heads, self.head_dim, device=DEV,
                                 generator=g).to(BF16)  # older tokens: what is not written must stay

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        if self.weights == "bf16":
            return gemv.gemv(x, self.w, self.bias)
        return gemv.gemv_quant(x, self.qweight, self.scales, self.bits, self.bias)

    def unfused(self, x, positions, slots, k_cache, v_cache) -> torch.Tensor:
        qkv = self.plain(x)
        q, k, v = qkv.view(x.shape[0], -1, self.head_dim).split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        apply_rotary_and_store_kv_(positions, q, k, v, self.rotary.cos, self.rotary.sin, True, k_cache, v_cache,
                                   slots)
        return q.reshape(x.shape[0], -1)

    def fused(self, x, positions, slots, k_cache, v_cache) -> torch.Tensor:
        store = (positions, self.rotary.cos, self.rotary.sin, k_cache, v_cache, slots)
        if self.weights == "bf16":
            q = gemv.gemv_rope_store(x, self.w, self.bias, *store)
        else:
            q = gemv.gemv_quant_rope_store(x, self.qweight, self.scales, self.bits, self.bias, *store)
        assert q is not None, "the production shapes fit the fused layout"
        return q


def _check(proj: Projection, x, positions, slots) -> None:
    ku, vu = proj.cache.clone().unbind(0)
    kf, vf = proj.cache.clone().unbind(0)
    want = proj.unfused(x, positions, slots, ku, vu)
    got = proj.fused(x, positions, slots, kf, vf)
    torch.cuda.synchronize()
    assert torch.equal(got, want), f"q differs by up to {(got.float() - want.float()).abs().max()}"
    assert torch.equal(kf, ku), "k cache"
    assert torch.equal(vf, vu), "v cache"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("weights,bias", WEIGHTS)
def test_fused_equals_unfused_eager(rotaries, shape: str, weights: str, bias: bool) -> None:
    proj = Projection(shape, weights, bias, rotaries[SHAPES[shape][3]])
    g = torch.Generator(device=DEV).manual_seed(7)
    with pdl.override(True):
        for pos, slot in STEPS:
            x = torch.randn(1, proj.hidden, device=DEV, generator=g).to(BF16)
            _check(proj, x, torch.tensor([pos], device=DEV), torch.tensor([slot], device=DEV))
        # several rows (ERNIESERVE_DENSE_GEMV_MAX_TOKENS > 1), one of them padding
        x = torch.randn(3, proj.hidden, device=DEV, generator=g).to(BF16)
        _check(proj, x, torch.tensor([3, 70000, 12], device=DEV), torch.tensor([900, -1, 7], device=DEV))


@pytest.mark.parametrize("shape", ["21b", "03b"])
@pytest.mark.parametrize("weights,bias", WEIGHTS)
def test_fused_equals_unfused_in_replayed_graphs(rotaries, shape: str, weights: str, bias: bool) -> None:
    proj = Projection(shape, weights, bias, rotaries[SHAPES[shape][3]])
    x = torch.zeros(1, proj.hidden, device=DEV, dtype=BF16)
    positions = torch.zeros(1, dtype=torch.int64, device=DEV)
    slots = torch.zeros(1, dtype=torch.int64, device=DEV)
    ku, vu = proj.cache.clone().unbind(0)
    kf, vf = proj.cache.clone().unbind(0)
    with pdl.override(True):
        proj.unfused(x, positions, slots, ku, vu)  # compile outside the capture
        proj.fused(x, positions, slots, kf, vf)
        torch.cuda.synchronize()
        graphs = {}
        outs = {}
        for name, fn, caches in (("unfused", proj.unfused, (ku, vu)), ("fused", proj.fused, (kf, vf))):
            graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[name]):
                outs[name] = fn(x, positions, slots, *caches)
    g = torch.Generator(device=DEV).manual_seed(11)
    for pos, slot in STEPS:
        x.copy_(torch.randn(1, proj.hidden, device=DEV, generator=g))
        positions.fill_(pos)
        slots.fill_(slot)
        graphs["unfused"].replay()
        graphs["fused"].replay()
        torch.cuda.synchronize()
        assert torch.equal(outs["fused"], outs["unfused"]), (pos, slot)
        assert torch.equal(kf, ku) and torch.equal(vf, vu), (pos, slot)
    # and the replayed graph matches an eager fused step on the same inputs
    ke, ve = kf.clone(), vf.clone()
    with pdl.override(True):
        eager = proj.fused(x, positions, slots, ke, ve)
    graphs["fused"].replay()
    torch.cuda.synchronize()
    assert torch.equal(outs["fused"], eager) and torch.equal(kf, ke) and torch.equal(vf, ve)


# ---- the decoder's attention block, fused against unfused ------------------------------------------


def _switch(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setenv("ERNIESERVE_FUSED_QKV_ROPE", "1" if on else "0")
    gemv.fused_qkv_rope_enabled.cache_clear()


def _block(weights: str, rotary: RotaryEmbedding) -> tuple[DecoderAttention, TritonAttentionBackend]:
    hidden, heads, kv_heads, head_dim = SHAPES["21b"]
    cfg = SimpleNamespace(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          head_dim=head_dim, rms_norm_eps=1e-5)
    spec = DecoderSpec(rope_interleaved=True, qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)
    backend = TritonAttentionBackend(heads, kv_heads, head_dim)
    config = None if weights == "bf16" else WeightOnlyConfig(8 if weights == "int8" else 4)
    with torch.device(DEV), quantization_scope(config):
        block = DecoderAttention(cfg, spec, backend, BF16, SINGLE, rotary)
    g = torch.Generator(device=DEV).manual_seed(3)
    for proj in (block.qkv_proj, block.o_proj):
        if config is None:
            proj.weight.data.normal_(0.0, hidden**-0.5, generator=g)
        else:
            proj.method.init_random(proj, g, std=hidden**-0.5)
    return block, backend


def _decode_meta(seq_len: int, slot: int, max_blocks: int) -> AttentionMetadata:
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    seq = torch.tensor([seq_len], dtype=torch.int32)
    return AttentionMetadata(
        num_reqs=1, num_tokens=1, max_query_len=1, max_seq_len=MAX_POS, query_start_loc=qsl.to(DEV),
        seq_lens=seq.to(DEV), block_tables=torch.arange(max_blocks, dtype=torch.int32, device=DEV)[None],
        slot_mapping=torch.tensor([slot], device=DEV), query_start_loc_cpu=qsl, seq_lens_cpu=seq,
        is_decode_only=True)


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_decoder_attention_fused_equals_unfused(monkeypatch: pytest.MonkeyPatch, rotaries, weights: str) -> None:
    """21B-A3B's attention block at one decode token over a 700-token context: the o_proj output and
    the cache are the same bits with the switch on (the fused projection taken in every call) and off,
    eager and replayed from CUDA graphs."""
    block, backend = _block(weights, rotaries[128])
    hidden, _, kv_heads, head_dim = SHAPES["21b"]
    caches = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim, device=DEV).to(BF16)
    calls = {"n": 0}
    for name in ("gemv_rope_store", "gemv_quant_rope_store"):
        real = getattr(gemv, name)
        monkeypatch.setattr(gemv, name, lambda *a, _real=real, **kw: calls.__setitem__("n", calls["n"] + 1)
                            or _real(*a, **kw))
    seq_len = 700
    meta = _decode_meta(seq_len, seq_len - 1, NUM_BLOCKS)  # block i of the request is cache block i
    positions = torch.tensor([seq_len - 1], device=DEV)
    x = torch.randn(1, hidden, device=DEV).to(BF16)
    backend.init_cuda_graph_state(1, NUM_BLOCKS, DEV)
    outs, states, graphs = {}, {}, {}
    with pdl.override(True):
        for on in (False, True):
            _switch(monkeypatch, on)
            states[on] = caches.clone()
            block.attn.kv_cache = tuple(states[on].unbind(0))
            eager = block(positions, x, meta)
            torch.cuda.synchronize()
            outs[on] = eager
            graphs[on] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[on]):
                outs[("graph", on)] = block(positions, x, meta)
    gemv.fused_qkv_rope_enabled.cache_clear()  # read afresh after monkeypatch restores the environment
    assert calls["n"] == 2, "the fused projection ran eagerly and was captured, with the switch on only"
    torch.cuda.synchronize()
    assert torch.equal(outs[True], outs[False])
    assert torch.equal(states[True], states[False])
    g = torch.Generator(device=DEV).manual_seed(5)
    for step in range(3):  # later tokens: fresh x, position, slot and context length in the same buffers
        x.copy_(torch.randn(1, hidden, device=DEV, generator=g))
        positions.fill_(seq_len + step)
        meta.slot_mapping.fill_(seq_len + step)
        meta.seq_lens.fill_(seq_len + step + 1)
        graphs[False].replay()
        graphs[True].replay()
        torch.cuda.synchronize()
        assert torch.equal(outs[("graph", True)], outs[("graph", False)]), step
        assert torch.equal(states[True], states[False]), step


# ---- the engine: ERNIE-4.5-0.3B's shapes, greedy tokens with the switch on and off ----------------


@pytest.fixture(scope="module")
def ernie_03b(tmp_path_factory: pytest.TempPathFactory):
    from ernieserve.checkpoint.dummy import write_dummy_checkpoint

    return write_dummy_checkpoint("ernie-4.5-0.3b", tmp_path_factory.mktemp("ernie-03b"), dtype="bfloat16")


@pytest.mark.parametrize("quantization", [None, "wint8", "wint4"])
def test_engine_greedy_tokens_same_with_the_switch(ernie_03b, monkeypatch: pytest.MonkeyPatch,
                                                    quantization: str | None) -> None:
    """One request at a time (batch-1 decode steps, replayed from CUDA graphs: the fused path), random
    0.3B weights: ERNIESERVE_FUSED_QKV_ROPE=1 gives the greedy tokens of =0, and takes the fused
    projection (during warm-up / capture; replays do not call Python)."""
    from ernieserve import LLM, SamplingParams

    if not pdl.pdl_enabled(DEV):
        pytest.skip("the fused projection runs where the one-row GEMV does: PDL on (sm_90+)")
    calls = {"n": 0}
    for name in ("gemv_rope_store", "gemv_quant_rope_store"):
        real = getattr(gemv, name)
        monkeypatch.setattr(gemv, name, lambda *a, _real=real, **kw: calls.__setitem__("n", calls["n"] + 1)
                            or _real(*a, **kw))
    gen = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(10, 100000, (n,), generator=gen).tolist()} for n in (1, 17, 300)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def run(on: bool) -> list[list[int]]:
        _switch(monkeypatch, on)
        llm = LLM(model=str(ernie_03b), dtype="bfloat16", max_model_len=512, max_num_seqs=1,
                  quantization=quantization)
        assert llm.llm_engine.core.runner.graphs is not None, "decode from CUDA graphs"
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
        torch.cuda.empty_cache()
        return out

    plain = run(False)
    assert calls["n"] == 0
    fused = run(True)
    gemv.fused_qkv_rope_enabled.cache_clear()
    assert calls["n"] > 0, "the fused projection was never taken"
    assert fused == plain
