"""Programmatic dependent launch (kernels/pdl.py, ERNIESERVE_PDL=1) changes when kernels start, never
what they compute: PDL on and off must give the same bits, eager, inside replayed CUDA graphs, and
through the engine's graph-replayed decode.

The kernel chain below is one ERNIE-4.5-21B-A3B decoder layer's decode path at its real shapes, with
the Triton kernels back to back as in the model, so every PDL kernel follows another PDL kernel
(programmatic edges in the graph): norm (+ residual) -> qkv GEMV (kernels/gemv.py: its weight slice
loaded before the wait) -> rotary + KV store -> split-K decode attention (its tile counters) -> o_proj
GEMV -> norm -> router (gate GEMV + top-k, its ticket counter) ->
MoE align -> gate/up -> down -> norm over the MoE slots (+ residual) -> silu-and-mul. Graphs are
replayed on fresh inputs many times without a sync between replays, so a wait that came too late
(a stale activation, a counter not yet put back to zero) shows up as a difference.

Needs Hopper or later (PDL is sm_90+; elsewhere pdl_enabled is False and there is nothing to
compare). Run on the GPU machine: `pytest -m gpu tests/gpu/test_pdl_gpu.py`, without TRITON_INTERPRET.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if torch.cuda.get_device_capability() < (9, 0):
    pytest.skip("programmatic dependent launch needs sm_90 or later", allow_module_level=True)

pytest.importorskip("triton")

from ernieserve.kernels import pdl  # noqa: E402
from ernieserve.kernels.gemv import gemv  # noqa: E402
from ernieserve.kernels.activation import silu_and_mul  # noqa: E402
from ernieserve.kernels.fused_norm import rms_norm  # noqa: E402
from ernieserve.kernels.paged_attention import paged_attention_decode  # noqa: E402
from ernieserve.kernels.rotary import apply_rotary_and_store_kv_  # noqa: E402
from ernieserve.layers.moe import fused_moe as fm  # noqa: E402
from ernieserve.layers.moe.fused_moe import fused_moe_triton, triton_route  # noqa: E402
from ernieserve.layers.moe.router import RouterConfig  # noqa: E402
from tests.gpu.graph_capture import capture  # noqa: E402

DEV = torch.device("cuda")
# ERNIE-4.5-21B-A3B
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 2560, 20, 4, 128, 64
EXPERTS, TOP_K, SHARED, INTER = 64, 6, 2, 1536
EPS, MAX_POS, NUM_SPLITS = 1e-5, 4096, 8


@contextlib.contextmanager
def pdl_env(on: bool, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """ERNIESERVE_PDL set to 1 / 0 for the block, the switch's cached read of it cleared around it."""
    with monkeypatch.context() as m:
        m.setenv(pdl.ENV_VAR, "1" if on else "0")
        pdl.env_enabled.cache_clear()
        try:
            yield
        finally:
            pdl.env_enabled.cache_clear()


def test_switch_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pdl_env(True, monkeypatch):
        assert pdl.pdl_enabled(DEV), "sm_90+, a Triton with launch_pdl and ERNIESERVE_PDL=1: PDL must be on"
    with pdl_env(False, monkeypatch):
        assert not pdl.pdl_enabled(DEV)


def _compiled_pdl_variants(kernel) -> int | None:
    """How many of this JITFunction's compiled variants were built with launch_pdl (None: this
    Triton keeps its cache in a form this does not know)."""
    caches = getattr(kernel, "device_caches", None)
    if not caches:
        return None
    count = 0
    for entry in caches.values():
        if not isinstance(entry, tuple) or not isinstance(entry[0], dict):
            return None
        count += sum(bool(getattr(k.metadata, "launch_pdl", False)) for k in entry[0].values())
    return count


class Layer:
    """Weights and persistent (graph-static) inputs of one decoder layer's decode step."""

    def __init__(self, tokens: int, seed: int = 0) -> None:
        g = torch.Generator(device=DEV).manual_seed(seed)

        def randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
            return (torch.randn(*shape, device=DEV, generator=g) * scale).to(dtype)

        self.tokens = tokens
        self.ln1, self.ln2, self.ln3 = (randn(HIDDEN, scale=0.3) + 1.0 for _ in range(3))
        self.wqkv = randn((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, scale=HIDDEN**-0.5)
        self.wo = randn(HIDDEN, HEADS * HEAD_DIM, scale=(HEADS * HEAD_DIM) ** -0.5)
        self.gate = randn(EXPERTS, HIDDEN, scale=HIDDEN**-0.5, dtype=torch.float32)  # ERNIE: fp32 gate
        self.bias = randn(EXPERTS, scale=0.01, dtype=torch.float32)
        n = EXPERTS + SHARED  # shared experts folded in as the last ids
        self.w13 = randn(n, 2 * INTER, HIDDEN, scale=HIDDEN**-0.5)
        self.w2 = randn(n, HIDDEN, INTER, scale=INTER**-0.5)
        inv = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, device=DEV).float() / HEAD_DIM))
        angles = torch.arange(MAX_POS, device=DEV).float()[:, None] * inv[None, :]
        self.cos, self.sin = angles.cos().contiguous(), angles.sin().contiguous()
        self.router = RouterConfig(EXPERTS, TOP_K, True, 1e-12, True, True)
        # contexts of a few hundred to ~3000 keys: several decode splits are used (tile counters)
        blocks_per_req = MAX_POS // BLOCK_SIZE
        self.num_blocks = tokens * blocks_per_req + 4
        perm = torch.randperm(self.num_blocks, device=DEV, generator=g)[: tokens * blocks_per_req]
        self.block_tables = perm.view(tokens, blocks_per_req).to(torch.int32).contiguous()
        self.x = torch.zeros(tokens, HIDDEN, device=DEV, dtype=torch.bfloat16)
        self.res = torch.zeros_like(self.x)
        self.seq_lens = torch.zeros(tokens, dtype=torch.int32, device=DEV)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=DEV)
        self.slots = torch.zeros(tokens, dtype=torch.int64, device=DEV)
        self.scratch = torch.empty(tokens * HEADS * NUM_SPLITS * (HEAD_DIM + 1), device=DEV)
        self.cache0 = randn(2, self.num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)

    def new_inputs(self, seed: int) -> None:
        g = torch.Generator(device=DEV).manual_seed(1000 + seed)
        self.x.copy_(torch.randn(self.x.shape, device=DEV, generator=g))
        self.res.copy_(torch.randn(self.res.shape, device=DEV, generator=g))
        lens = torch.randint(200, 3000, (self.tokens,), device=DEV, generator=g)
        self.seq_lens.copy_(lens)
        self.positions.copy_(lens - 1)
        pos = lens - 1
        rows = torch.arange(self.tokens, device=DEV)
        self.slots.copy_(self.block_tables[rows, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)

    def step(self, cache: torch.Tensor, moe_alignment: str = "align") -> dict[str, torch.Tensor]:
        """The decode path of one layer; returns every intermediate worth comparing. moe_alignment:
        "align" (the experts' own align launch), "router" (the router's last program aligns:
        triton_route_align), "static" (one GEMM block per assignment: per_assignment_alignment)."""
        t = self.tokens
        k_cache, v_cache = cache.unbind(0)
        h, res1 = rms_norm(self.x, self.ln1, EPS, residual=self.res)
        qkv = gemv(h, self.wqkv).view(t, HEADS + 2 * KV_HEADS, HEAD_DIM)
        q, k, v = qkv.split([HEADS, KV_HEADS, KV_HEADS], dim=1)
        q = apply_rotary_and_store_kv_(self.positions, q, k, v, self.cos, self.sin, True, k_cache, v_cache,
                                       self.slots)
        attn = paged_attention_decode(q, k_cache, v_cache, self.seq_lens, self.block_tables, HEAD_DIM**-0.5,
                                      NUM_SPLITS, scratch=self.scratch)
        o = gemv(attn.view(t, HEADS * HEAD_DIM), self.wo)
        h2, res2 = rms_norm(o, self.ln2, EPS, residual=res1)
        alignment = None
        if moe_alignment == "router":
            block_m = fm.choose_tile_config(t * (TOP_K + SHARED), EXPERTS + SHARED).block_m
            weights, ids, alignment = fm.triton_route_align(h2, self.gate, self.router, self.bias, SHARED, block_m)
        else:
            weights, ids = triton_route(h2, self.gate, self.router, self.bias, SHARED)
            if moe_alignment == "static":
                block_m = fm.choose_tile_config(t * (TOP_K + SHARED), EXPERTS + SHARED).block_m
                alignment = fm.per_assignment_alignment(ids, EXPERTS + SHARED, block_m)
                assert alignment is not None
        slots = fused_moe_triton(h2, self.w13, self.w2, weights, ids, sum_slots=False, alignment=alignment,
                                 shared_slots=SHARED)
        h3, res3 = rms_norm(slots, self.ln3, EPS, residual=res2)
        act = silu_and_mul(h3)
        return {"h": h, "res1": res1, "q": q, "attn": attn, "o": o, "h2": h2, "weights": weights, "ids": ids,
                "slots": slots, "h3": h3, "res3": res3, "act": act, "cache": cache}


def _snapshot(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in outputs.items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    for name in want:
        assert torch.equal(got[name], want[name]), f"{where}: {name} differs with PDL"


@pytest.mark.parametrize("tokens", [1, 4])
def test_decode_layer_chain_pdl_matches_plain_eager_and_in_graphs(tokens: int) -> None:
    layer = Layer(tokens)
    layer.new_inputs(0)
    caches = {on: layer.cache0.clone() for on in (False, True)}

    # eager, one step each way, same inputs and cache
    eager = {}
    for on in (False, True):
        with pdl.override(on):
            eager[on] = _snapshot(layer.step(caches[on]))
    torch.cuda.synchronize()
    _assert_same(eager[True], eager[False], "eager")
    from ernieserve.kernels import fused_norm

    compiled = _compiled_pdl_variants(fused_norm._rms_norm_kernel)
    assert compiled is None or compiled > 0, "no rms_norm variant was compiled with launch_pdl"

    # graphs: captured once each way, replayed on fresh inputs back to back (no sync in between)
    graphs = {}
    for on in (False, True):
        with pdl.override(on):
            graphs[on] = capture(functools.partial(layer.step, caches[on]))
    for seed in range(1, 21):
        layer.new_inputs(seed)
        graphs[False][0].replay()
        graphs[True][0].replay()
        graphs[True][0].replay()  # twice: every counter must be back at zero, every input re-read
        torch.cuda.synchronize()
        _assert_same(graphs[True][1], graphs[False][1], f"graph replay {seed}")


# The router-side alignment (off by default) only at one token: at 8 its first GPU run (883866a) hit an
# illegal memory access, which would take every later test of the process down with it.
@pytest.mark.parametrize("tokens,moe_alignment,down_early", [
    (1, "static", False), (1, "static", True), (4, "static", True), (1, "router", False),
    (1, "align", True), (4, "align", True)])
def test_decode_layer_chain_moe_shortcuts_keep_the_bits(tokens: int, moe_alignment: str, down_early: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The MoE layer's launch savings (one GEMM block per assignment, the router aligning, the down
    GEMM reading its routing before the PDL wait) against the plain chain without PDL, eager: the
    same bits, eager and over 20 back-to-back replays of a PDL graph on fresh inputs."""
    layer = Layer(tokens, seed=3)
    layer.new_inputs(0)
    caches = {on: layer.cache0.clone() for on in (False, True)}
    with pdl.override(False):
        want = _snapshot(layer.step(caches[False]))
    monkeypatch.setattr(fm, "down_early", lambda: down_early)
    # with one block per assignment, the shared experts' gate/up blocks before the wait too
    monkeypatch.setattr(fm, "shared_early", lambda: True)
    with pdl.override(True):
        got = _snapshot(layer.step(caches[True], moe_alignment))
        torch.cuda.synchronize()
        _assert_same(got, want, "eager")
        graph, out = capture(functools.partial(layer.step, caches[True], moe_alignment))
    for seed in range(1, 21):
        layer.new_inputs(seed)
        with pdl.override(False):
            want = _snapshot(layer.step(caches[False]))
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(out, want, f"graph replay {seed}")


def test_fused_moe_pdl_graph_many_replays() -> None:
    """The MoE block alone (route, align, gate/up, down) at batch 1, where its kernels are shortest:
    50 replays of the PDL graph queued without a sync, each on its own input row, against eager
    non-PDL results."""
    layer = Layer(1)
    rows = torch.randn(50, HIDDEN, device=DEV).bfloat16()
    x = torch.zeros(1, HIDDEN, device=DEV, dtype=torch.bfloat16)

    def moe() -> torch.Tensor:
        h = rms_norm(x, layer.ln2, EPS)
        weights, ids = triton_route(h, layer.gate, layer.router, layer.bias, SHARED)
        return fused_moe_triton(h, layer.w13, layer.w2, weights, ids)

    want = []
    with pdl.override(False):
        for i in range(rows.shape[0]):
            x.copy_(rows[i:i + 1])
            want.append(moe().clone())
    with pdl.override(True):
        graph, out = capture(moe)
    got = torch.empty(rows.shape[0], HIDDEN, device=DEV, dtype=torch.bfloat16)
    for i in range(rows.shape[0]):
        x.copy_(rows[i:i + 1])
        graph.replay()
        got[i:i + 1].copy_(out)
    torch.cuda.synchronize()
    for i in range(rows.shape[0]):
        assert torch.equal(got[i:i + 1], want[i]), f"replay {i} differs"


@pytest.mark.parametrize("tokens", [1, 8])
def test_decode_attention_pdl_graph_matches_eager(tokens: int) -> None:
    """Split-K decode attention after rotary + store, in one PDL graph vs eager without PDL."""
    layer = Layer(tokens, seed=5)
    cache_plain, cache_pdl = layer.cache0.clone(), layer.cache0.clone()

    def attend(cache: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = cache.unbind(0)
        qkv = torch.nn.functional.linear(layer.x, layer.wqkv).view(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM)
        q, k, v = qkv.split([HEADS, KV_HEADS, KV_HEADS], dim=1)
        q = apply_rotary_and_store_kv_(layer.positions, q, k, v, layer.cos, layer.sin, True, k_cache, v_cache,
                                       layer.slots)
        out = paged_attention_decode(q, k_cache, v_cache, layer.seq_lens, layer.block_tables, HEAD_DIM**-0.5,
                                     NUM_SPLITS, scratch=layer.scratch)
        return rms_norm(out.view(tokens, HEADS * HEAD_DIM)[:, :HIDDEN], layer.ln1, EPS)

    layer.new_inputs(0)
    with pdl.override(True):
        attn_graph, attn_out = capture(functools.partial(attend, cache_pdl))
    with pdl.override(False):
        attend(cache_plain)  # the same warm-up write as the PDL side's
    torch.cuda.synchronize()
    for seed in range(1, 11):
        layer.new_inputs(seed)
        attn_graph.replay()
        torch.cuda.synchronize()
        with pdl.override(False):
            want = attend(cache_plain)
        torch.cuda.synchronize()
        assert torch.equal(attn_out, want), f"inputs {seed}: attention differs with PDL"
        assert torch.equal(cache_pdl, cache_plain)


@pytest.mark.parametrize("model", ["tiny-ernie-4.5-moe", "tiny-ernie-4.5"])
def test_engine_greedy_tokens_same_with_pdl(model: str, checkpoint_factory, monkeypatch) -> None:
    """The engine with ERNIESERVE_PDL=1 (decode replayed from CUDA graphs, PDL edges inside them, and
    eager) gives the greedy tokens it gives with PDL off."""
    from ernieserve import LLM, SamplingParams
    from ernieserve.kernels import fused_norm

    ckpt = checkpoint_factory(model)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(7)
    prompts = [{"prompt_token_ids": torch.randint(10, vocab - 10, (int(n),), generator=gen).tolist()}
               for n in torch.randint(1, 200, (16,), generator=gen)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    common = dict(dtype="bfloat16", max_model_len=512, max_num_seqs=16)

    def run(on: bool, **kw) -> list[list[int]]:
        with pdl_env(on, monkeypatch):
            assert pdl.pdl_enabled(DEV) == on
            llm = LLM(model=str(ckpt), **common, **kw)
            used_graphs = llm.llm_engine.core.runner.graphs is not None
            out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            del llm
            torch.cuda.empty_cache()
        assert used_graphs or kw.get("enforce_eager")
        return out

    plain = run(False)
    with_pdl = run(True)
    compiled = _compiled_pdl_variants(fused_norm._rms_norm_kernel)
    assert compiled is None or compiled > 0, "ERNIESERVE_PDL=1 compiled no PDL variant of rms_norm"
    assert with_pdl == plain
    # eager against eager: padded graph batches may take other cuBLAS kernels than eager ones
    assert run(True, enforce_eager=True) == run(False, enforce_eager=True)
