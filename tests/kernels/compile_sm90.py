#!/usr/bin/env python3
"""Compile every Triton kernel the project launches for Hopper (sm_90), ahead of time, on a CPU.

The CPU test suite runs the kernels in Triton's interpreter, which accepts programs the real
compiler refuses (`tl.atomic_xchg` on a bf16 pointer passed there and failed on the H100 with
"atomic_xchg does not support bf16"). This script runs the compiler itself, the whole way to a
cubin (ptxas included), for the argument types production passes, with no GPU:

1. Record. Every @triton.jit function of the project's kernel modules is replaced by a recorder
   whose ``[grid](*args, **kwargs)`` notes the launch instead of running it. The project's own
   Python wrappers are then called with small CPU tensors of the dtypes serving uses (bf16
   activations, int8 / packed uint8 weights, float8_e4m3fn, int32 counters...), at the model
   shapes and tile policies of an H100 (132 SMs), so each kernel is launched the way it is there.
2. Build each launch's signature from its arguments, as Triton's launcher does (its own
   `native_specialize_impl`): tensors become typed pointers (with the launcher's 16-byte alignment
   attribute, from the real data pointer), ``tl.constexpr`` parameters and None arguments
   constexprs, Python ints i32 / i64 *without* value specialisation (so branches that only some
   values take are compiled too), floats fp32, bools u1. ``num_warps``, ``num_stages``,
   ``enable_fp_fusion``... are compile options. Identical (kernel, signature, constexprs,
   alignment, options) launches are compiled once.
3. Compile each with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and check that its
   shared memory fits an H100 (what Triton checks at the first launch). One line per variant;
   the exit status is 1 if any failed.

On CPU tensors the wrappers pick a few constexprs for the interpreter (fp32 dot operands, no
libdevice); `_CUDA_VALUES` puts back the values the same wrappers pass for CUDA tensors, so the
compiled programs are the ones an H100 runs. Run without TRITON_INTERPRET:

    python3 tests/kernels/compile_sm90.py [-v] [-j JOBS] [--only SUBSTRING] [--as-recorded] [--dump DIR]
        [--specialize] [--pdl {both,off,on}]

``--dump DIR`` also writes each variant's TTGIR, PTX and SASS there; with ``--specialize`` the
integer arguments are specialised on their values as the launcher does (strides divisible by 16
let loads vectorise), which is the code an H100 runs: count instructions on those.

Programmatic dependent launch (kernels/pdl.py): the wrappers pass ``PDL=True, launch_pdl=True`` only
when `pdl_enabled` says so, which it never does for CPU tensors. ``--pdl both`` (the default) records
every wrapper call twice, the second time under ``pdl.override(True)`` (cases marked ``[pdl]``), so
the PDL variants compile too; ``off`` / ``on`` record one of the two. Each variant's PTX is checked:
``griddepcontrol.wait`` and ``griddepcontrol.launch_dependents`` in every variant launched with
``launch_pdl``, in none of the others; and a kernel's ``PDL`` constexpr must match its ``launch_pdl``.

tests/kernels/test_compile_sm90.py runs it in the CPU test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 77  # the test skips on this: no triton, no nvidia backend or ptxas, or interpreter mode

ARCH = 90  # Hopper
H100_SMS = 132
H100_MAX_SHARED = 232448  # bytes per block (opt-in), what Triton checks at the first launch on an H100


def environment_problem() -> str | None:
    """Why this machine cannot compile for sm_90, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    from triton import knobs
    from triton.backends import backends

    if knobs.runtime.interpret:
        return "TRITON_INTERPRET is set: @triton.jit functions are interpreted, not compilable; unset it"
    if "nvidia" not in backends:
        return f"triton has no nvidia backend (backends: {sorted(backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(ARCH).path
    except Exception as exc:  # noqa: BLE001 - any failure to find ptxas means: cannot compile here
        return f"triton's nvidia backend has no ptxas for sm_{ARCH} ({exc})"
    return None


# ---- recording -------------------------------------------------------------------------------------

# Constexprs the wrappers derive from the tensors' device, and their value for CUDA tensors:
# DOT_FP32 upcasts dot operands (the interpreter multiplies bf16 as raw bits and has no fp8 dot),
# LIBDEVICE_EXP picks libdevice's expf (the interpreter has no libdevice), INLINE_ASM the int4
# kernels' inline PTX (the interpreter cannot run it). Where DOT_FP32 was on,
# the weight-only and quantized-MoE wrappers also chose "ieee" precision for the fp32 dot; with
# bf16 activations (all of this script's) they choose "tf32" on CUDA. A new device-dependent
# constexpr in a wrapper needs an entry here.
_CUDA_VALUES = {"DOT_FP32": False, "LIBDEVICE_EXP": True, "INLINE_ASM": True}
_PRECISION_PARAMS = ("PRECISION", "DOT_PRECISION")


@dataclasses.dataclass
class Launch:
    case: str  # which wrapper call launched it
    fn: Any  # the JITFunction
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: dict[str, Any]
    rewrites: list[str]  # constexprs set to their CUDA value

    @property
    def name(self) -> str:
        return f"{self.fn.module}.{self.fn.__name__}"

    def key(self) -> tuple:
        def items(d: dict) -> tuple:
            return tuple(sorted((k, repr(v)) for k, v in d.items()))

        return (self.name, tuple(self.signature.items()), items(self.constexprs), items(self.attrs), items(self.options))

    def describe(self) -> str:
        consts = ", ".join(f"{self.fn.arg_names[k[0]]}={v!r}" for k, v in sorted(self.constexprs.items())
                           if self.fn.params[k[0]].is_constexpr)
        nones = [self.fn.arg_names[k[0]] for k, v in self.constexprs.items() if not self.fn.params[k[0]].is_constexpr]
        ptrs = ", ".join(f"{n}:{t}" for n, t in self.signature.items() if t.startswith("*"))
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        extra = f"; None: {', '.join(nones)}" if nones else ""
        return f"[{consts}{extra}] ({ptrs}) {{{opts}}}"


class Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn: Any, session: "Session") -> None:
        self.fn = fn
        self.session = session

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.session.record(self.fn, args, kwargs)

        return launch

    def __getattr__(self, name: str) -> Any:  # arg_names, __name__, ... of the kernel
        return getattr(self.fn, name)


class Session:
    def __init__(self, as_recorded: bool, specialize: bool = False) -> None:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.compiler.compiler import make_backend

        self.backend = make_backend(_target())
        self.option_names = set(CUDAOptions.__dataclass_fields__)
        self.as_recorded = as_recorded
        self.specialize = specialize
        self.case = "?"
        self.case_suffix = ""  # " [pdl]" while recording under pdl.override(True)
        self.launches: list[Launch] = []
        self.case_errors: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def in_case(self, label: str) -> Iterator[None]:
        label += self.case_suffix
        self.case = label
        try:
            yield
        except Exception:  # noqa: BLE001 - a wrapper that cannot be called is reported, the rest go on
            self.case_errors.append((label, traceback.format_exc()))
        finally:
            self.case = "?"

    def record(self, fn: Any, args: tuple, kwargs: dict) -> None:
        self.launches.append(self.build(fn, args, kwargs))

    def build(self, fn: Any, args: tuple, kwargs: dict) -> Launch:
        import torch
        from triton._C.libtriton import native_specialize_impl

        arg_kwargs = {k: v for k, v in kwargs.items() if k in fn.arg_names}
        options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
        unknown = sorted(set(options) - self.option_names)
        if unknown:
            raise TypeError(f"{fn.__name__}: {unknown} are neither parameters nor compile options")
        launch_pdl = bool(options.get("launch_pdl", False))
        if "PDL" in fn.arg_names:
            pdl_param = fn.params[fn.arg_names.index("PDL")]
            pdl_value = arg_kwargs.get("PDL", pdl_param.default)
            if bool(pdl_value) != launch_pdl:
                raise TypeError(f"{fn.__name__}: PDL={pdl_value!r} but launch_pdl={launch_pdl}: a kernel that "
                                "waits must be launched with PDL and one launched with PDL must wait")
        elif launch_pdl:
            raise TypeError(f"{fn.__name__} is launched with launch_pdl but has no PDL constexpr (no gdc_wait)")
        bound = fn.signature.bind(*args, **arg_kwargs)
        bound.apply_defaults()
        backend_cls = type(self.backend)
        signature: dict[str, str] = {}
        constexprs: dict[tuple[int, ...], Any] = {}
        attrs: dict[tuple[int, ...], Any] = {}
        for kp, value in zip(fn.params, bound.arguments.values()):
            path = (kp.num,)
            if kp.is_constexpr or value is None:
                signature[kp.name] = "constexpr"
                constexprs[path] = value
                continue
            if isinstance(value, torch.Tensor):
                # the launcher's own type and 16-byte alignment specialisation of a pointer
                ty, attr = native_specialize_impl(backend_cls, value, kp.is_const, not kp.do_not_specialize,
                                                  not kp.do_not_specialize_on_alignment)
            elif isinstance(value, (bool, int, float)):
                # scalars: typed by value range only, never specialised on their value (unless
                # --specialize: then as the launcher does, == 1 and divisible by 16, which is
                # what the GPU runs and what instruction counts must be taken from)
                spec = self.specialize and not kp.do_not_specialize
                ty, attr = native_specialize_impl(backend_cls, value, kp.is_const, spec, spec)
                if ty == "constexpr":  # the launcher's == 1 case
                    signature[kp.name] = "constexpr"
                    constexprs[path] = attr
                    continue
            else:
                raise TypeError(f"{fn.__name__}: argument {kp.name} is a {type(value).__name__}, "
                                "which a launch cannot take unless the parameter is tl.constexpr")
            signature[kp.name] = ty
            if isinstance(attr, str):
                attrs[path] = self.backend.parse_attr(attr)
        rewrites: list[str] = []
        if not self.as_recorded:
            rewrites = self._cuda_values(fn, constexprs)
        return Launch(self.case, fn, signature, constexprs, attrs, options, rewrites)

    @staticmethod
    def _cuda_values(fn: Any, constexprs: dict[tuple[int, ...], Any]) -> list[str]:
        index = {name: (i,) for i, name in enumerate(fn.arg_names)}
        done = []
        for name, cuda_value in _CUDA_VALUES.items():
            if name in index and constexprs.get(index[name]) != cuda_value:
                done.append(f"{name}={constexprs[index[name]]!r}->{cuda_value!r}")
                constexprs[index[name]] = cuda_value
        if "DOT_FP32" in index and any(d.startswith("DOT_FP32=True") for d in done):
            for name in _PRECISION_PARAMS:
                if name in index and constexprs.get(index[name]) == "ieee":
                    done.append(f"{name}='ieee'->'tf32'")
                    constexprs[index[name]] = "tf32"
        return done


def kernel_modules() -> list[Any]:
    """Every ernieserve module that defines @triton.jit functions, imported."""
    names = []
    for path in sorted((REPO / "ernieserve").rglob("*.py")):
        if "@triton.jit" in path.read_text(encoding="utf-8"):
            rel = path.relative_to(REPO).with_suffix("")
            names.append(".".join(rel.parts))
    return [importlib.import_module(n) for n in names]


@contextlib.contextmanager
def recording(session: Session, modules: list[Any]) -> Iterator[dict[str, Any]]:
    """Every JITFunction attribute of these modules replaced by a Recorder; put back on exit (the
    compiler resolves a kernel's helpers through its module's globals, so this must end first)."""
    from triton.runtime.jit import JITFunction

    saved: list[tuple[Any, str, Any]] = []
    found: dict[str, Any] = {}
    for mod in modules:
        for attr, value in list(vars(mod).items()):
            if isinstance(value, JITFunction):
                saved.append((mod, attr, value))
                found[f"{value.module}.{value.__name__}"] = value
                setattr(mod, attr, Recorder(value, session))
    try:
        yield found
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


# ---- the wrapper calls -------------------------------------------------------------------------------

def run_cases(s: Session) -> None:
    import torch

    from ernieserve.kernels import activation, fp8_matmul as f8, fused_norm, paged_attention as pa
    from ernieserve.kernels import gemv, quant_matmul as qm, rotary, sampling, step_feed
    from ernieserve.layers.moe import fused_moe as fm, fused_moe_quant as fmq, moe_gemv
    from ernieserve.layers.moe.router import RouterConfig

    bf16, cpu, cuda = torch.bfloat16, torch.device("cpu"), torch.device("cuda")

    # The tile policies size split K from the SM count (torch.cuda.get_device_properties, no GPU
    # here): they are asked for an H100's tiles (132 SMs, device "cuda"), and the tiles are passed
    # to the wrappers explicitly.
    for mod in (qm, fmq):
        mod._num_sms = lambda _index: H100_SMS

    def zeros(*shape: int, dtype: torch.dtype = bf16) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype)

    # ---- the decode GEMV (PDL: weight slice before the wait): 21B-A3B's and 0.3B's projections,
    # Qwen2's qkv bias
    for name, (n, k) in {"21b qkv": (3584, 2560), "21b o": (2560, 2560), "03b qkv": (1536, 1024),
                         "03b gate_up": (6144, 1024), "03b down": (1024, 3072)}.items():
        with s.in_case(f"gemv {name}"):
            gemv.gemv(zeros(1, k), zeros(n, k))
    with s.in_case("gemv bias"):
        gemv.gemv(zeros(1, 1024), zeros(1536, 1024), zeros(1536))
    for bits in (8, 4):
        for name, (n, k) in {"21b qkv": (3584, 2560), "21b o": (2560, 2560), "03b down": (1024, 3072)}.items():
            stored = k if bits == 8 else k // 2
            with s.in_case(f"gemv_quant wint{bits} {name}"):
                gemv.gemv_quant(zeros(1, k), zeros(n, stored, dtype=torch.int8 if bits == 8 else torch.uint8),
                                zeros(n, 1, dtype=torch.float32), bits)
    real_packed = gemv.gemv_packed_enabled
    gemv.gemv_packed_enabled = lambda: not real_packed()  # int4's other product (ERNIESERVE_GEMV_PACKED)
    try:
        for name, (n, k) in {"21b qkv": (3584, 2560), "21b o": (2560, 2560)}.items():
            with s.in_case(f"gemv_quant wint4 {name} packed={gemv.gemv_packed_enabled()}"):
                gemv.gemv_quant(zeros(1, k), zeros(n, k // 2, dtype=torch.uint8), zeros(n, 1, dtype=torch.float32), 4)
        k_cache, v_cache = zeros(2, 8, 64, 4, 128).unbind(0)
        rope = (torch.zeros(1, dtype=torch.int64), torch.zeros(4096, 64), torch.zeros(4096, 64), k_cache, v_cache,
                torch.zeros(1, dtype=torch.int64))
        with s.in_case(f"gemv_quant_rope_store wint4 21b qkv packed={gemv.gemv_packed_enabled()}"):
            assert gemv.gemv_quant_rope_store(zeros(1, 2560), zeros(3584, 1280, dtype=torch.uint8),
                                              zeros(3584, 1, dtype=torch.float32), 4, None, *rope) is not None
    finally:
        gemv.gemv_packed_enabled = real_packed

    # ---- the qkv GEMV with the rotary + KV store epilogue (ERNIESERVE_FUSED_QKV_ROPE): 21B-A3B (hidden
    # 2560, 20 heads, 4 KV heads) and 0.3B (hidden 1024, 16 heads, 2 KV heads), head_dim 128, one decode
    # token, bf16 cache of 64-token blocks; bf16 / wint8 / wint4 weights, Qwen2-style bias once
    for name, (k, heads, kv_heads) in {"21b": (2560, 20, 4), "03b": (1024, 16, 2)}.items():
        n = (heads + 2 * kv_heads) * 128
        k_cache, v_cache = zeros(2, 8, 64, kv_heads, 128).unbind(0)
        rope = (torch.zeros(1, dtype=torch.int64), torch.zeros(4096, 64), torch.zeros(4096, 64), k_cache, v_cache,
                torch.zeros(1, dtype=torch.int64))
        with s.in_case(f"gemv_rope_store {name} qkv"):
            assert gemv.gemv_rope_store(zeros(1, k), zeros(n, k), None, *rope) is not None
        for bits in (8, 4):
            with s.in_case(f"gemv_quant_rope_store wint{bits} {name} qkv"):
                qw = zeros(n, k if bits == 8 else k // 2, dtype=torch.int8 if bits == 8 else torch.uint8)
                assert gemv.gemv_quant_rope_store(zeros(1, k), qw, zeros(n, 1, dtype=torch.float32), bits, None,
                                                  *rope) is not None
        if name == "03b":
            with s.in_case(f"gemv_rope_store {name} qkv bias"):
                assert gemv.gemv_rope_store(zeros(1, k), zeros(n, k), zeros(n), *rope) is not None

    # ---- attention: ERNIE-4.5-0.3B (16 heads, 2 KV heads) and 21B-A3B (20, 4); head_dim 128,
    # KV cache blocks of 64 tokens (CacheConfig's default), bf16 cache as the model dtype
    head_dim, block_size, num_blocks = 128, 64, 32
    for num_heads, num_kv in ((16, 2), (20, 4)):
        tag = f"h{num_heads}/kv{num_kv}"
        tokens = 40
        # q, k, v are views of the fused qkv projection's output, as in the decoder
        qkv = zeros(tokens, (num_heads + 2 * num_kv) * head_dim).view(tokens, -1, head_dim)
        q, k, v = qkv.split([num_heads, num_kv, num_kv], dim=1)
        k_cache, v_cache = zeros(2, num_blocks, block_size, num_kv, head_dim).unbind(0)
        slots = torch.arange(tokens, dtype=torch.int64)
        cos_sin = torch.zeros(4096, head_dim // 2)  # fp32 tables
        positions = torch.arange(tokens, dtype=torch.int64)
        with s.in_case(f"store_kv_triton {tag}"):
            pa.store_kv_triton(k, v, k_cache, v_cache, slots)
        for interleaved in (False, True):
            style = "interleaved" if interleaved else "neox"
            with s.in_case(f"apply_rotary_ {style} {tag}"):
                rotary.apply_rotary_(positions, q, k, cos_sin, cos_sin, interleaved)
            with s.in_case(f"apply_rotary_and_store_kv_ {style} {tag}"):
                rotary.apply_rotary_and_store_kv_(positions, q, k, v, cos_sin, cos_sin, interleaved,
                                                  k_cache, v_cache, slots)
        num_reqs = 3
        block_tables = torch.zeros(num_reqs, 8, dtype=torch.int32)
        seq_lens = torch.tensor([100, 20, 300], dtype=torch.int32)
        qsl = torch.tensor([0, 30, 35, tokens], dtype=torch.int32)
        query = q.contiguous()  # the backend makes the query contiguous
        with s.in_case(f"paged_attention_unified {tag}"):
            pa.paged_attention_unified(query, k_cache, v_cache, qsl, seq_lens, block_tables, 0.088,
                                       out=torch.zeros_like(query))
        dq = query[:num_reqs]
        for splits, scratch in ((1, None), (8, None), (8, torch.empty(4096 * 64, dtype=torch.float32))):
            label = f"paged_attention_decode num_splits={splits} scratch={'given' if scratch is not None else 'none'}"
            with s.in_case(f"{label} {tag}"):
                pa.paged_attention_decode(dq, k_cache, v_cache, seq_lens, block_tables, 0.088, splits,
                                          out=torch.zeros_like(dq), scratch=scratch)
        # a batch past LATENCY_PAIRS (request, KV head) pairs: the throughput tiles
        wide = pa.LATENCY_PAIRS // num_kv + 1
        with s.in_case(f"paged_attention_decode num_splits=2 batch={wide} {tag}"):
            wq = zeros(wide, num_heads, head_dim)
            pa.paged_attention_decode(wq, k_cache, v_cache, torch.full((wide,), 100, dtype=torch.int32),
                                      torch.zeros(wide, 8, dtype=torch.int32), 0.088, 2, out=torch.zeros_like(wq))

    # ---- elementwise: hidden 2560 (21B-A3B) and 1024 (0.3B), per-head q/k norm over head_dim 128
    for hidden in (1024, 2560):
        x = zeros(6, hidden)
        w = zeros(hidden)
        with s.in_case(f"rms_norm hidden={hidden}"):
            fused_norm.rms_norm(x, w, 1e-5)
        with s.in_case(f"rms_norm +residual hidden={hidden}"):
            fused_norm.rms_norm(x, w, 1e-5, residual=zeros(6, hidden))
    with s.in_case("rms_norm +residual, 8 MoE slot partials, hidden=2560"):
        fused_norm.rms_norm(zeros(6, 8, 2560), zeros(2560), 1e-5, residual=zeros(6, 2560))
    qkv = zeros(6, 24 * 128).view(6, 24, 128)
    with s.in_case("rms_norm per-head view [T, H, 128]"):
        fused_norm.rms_norm(qkv[:, :16], zeros(128), 1e-6)
    for bits in (8, 4):  # the weight-only prefill path's one-pass dequantization (then cuBLAS)
        with s.in_case(f"dequantize_into dense wint{bits}"):
            qm.dequantize_into(zeros(3584, 2560), zeros(3584, 2560 * bits // 8, dtype=torch.uint8 if bits == 4
                                                           else torch.int8), zeros(3584, 1, dtype=torch.float32), bits, 0)
    with s.in_case("silu_and_mul"):
        activation.silu_and_mul(zeros(6, 2 * 3072))

    # ---- sampling: the LM head's bf16 logits (graph path) and fp32 (eager, after processing)
    for dtype in (bf16, torch.float32):
        for rows in (1, 64):
            with s.in_case(f"gumbel_race {str(dtype)[6:]} rows={rows}"):
                sampling.gumbel_race(zeros(rows, 103424, dtype=dtype), torch.zeros(rows, dtype=torch.int64),
                                     torch.ones(rows))

    # ---- the in-flight feed at the start of a decode graph (pairs = batch size) and a mixed one
    for tokens, pairs in ((1, 1), (256, 256), (2048, 256)):
        with s.in_case(f"feed_prev_ids tokens={tokens} pairs={pairs}"):
            step_feed.feed_prev_ids(torch.zeros(tokens, dtype=torch.int64), torch.zeros(2, pairs, dtype=torch.int32),
                                    torch.zeros(256, dtype=torch.int64))

    # ---- weight-only GEMM: int8 / int4, per channel and group 128; decode tiles with split K 1 and
    # 4 (and the policy's own split at this shape), and the prefill tiles
    n, k = 256, 2560
    for bits in (8, 4):
        for group in (0, 128):
            qw = zeros(n, k if bits == 8 else k // 2, dtype=torch.int8 if bits == 8 else torch.uint8)
            sc = torch.zeros(n, qm.num_groups(k, group))
            bias = zeros(n)
            decode = qm.choose_tiles(1, n, k, group, cuda)
            tiles = {f"decode split_k={t}": dataclasses.replace(decode, split_k=t) for t in (1, 4)}
            tiles[f"decode policy split_k={decode.split_k}"] = decode
            tiles["prefill"] = qm.choose_tiles(512, n, k, group, cuda)
            for label, t in tiles.items():
                m = 1 if label.startswith("decode") else 512
                with s.in_case(f"weight_only_matmul int{bits} g{group} {label}"):
                    qm.weight_only_matmul(zeros(m, k), qw, sc, bits, group, None, t)
                with s.in_case(f"weight_only_matmul int{bits} g{group} {label} +bias"):
                    qm.weight_only_matmul(zeros(m, k), qw, sc, bits, group, bias, t)

    # ---- fp8 (e4m3) W8A8: activation quantization, block-wise and per-channel GEMMs
    fp8 = f8.FP8_DTYPE
    for kk in (1536, 2560):
        for group in (0, f8.SCALE_BLOCK):
            with s.in_case(f"quant_fp8_per_token_group K={kk} group={group}"):
                f8.quant_fp8_per_token_group(zeros(4, kk), group)
    for block_wise in (True, False):
        kind = "block-wise" if block_wise else "per-channel"
        wq = zeros(n, k, dtype=fp8)
        ws = torch.zeros(n // 128, k // 128) if block_wise else torch.zeros(n, 1)
        for m in (1, 512):
            xq = zeros(m, k, dtype=fp8)
            xs = torch.zeros(m, k // 128) if block_wise else torch.zeros(m, 1)
            t = f8.fp8_tiles(m, n, k, cuda)  # what the fp8 linear method passes
            variants = {f"m={m} policy split_k={t.split_k}": t}
            if m == 1:
                variants["m=1 split_k=1"] = dataclasses.replace(t, split_k=1)
            for label, tt in variants.items():
                with s.in_case(f"fp8_matmul {kind} {label}"):
                    f8.fp8_matmul(xq, xs, wq, ws, block_wise, bf16, None, tt)
                with s.in_case(f"fp8_matmul {kind} {label} +bias"):
                    f8.fp8_matmul(xq, xs, wq, ws, block_wise, bf16, zeros(n), tt)

    # ---- MoE: ERNIE-4.5-21B-A3B's experts (64, top-6, hidden 2560, inter 1536); weights are empty
    # tensors (never read: nothing runs). Decode (1 token) and prefill (4096 tokens) tile policies.
    E, top_k, H, I = 64, 6, 2560, 1536
    router = RouterConfig(E, top_k, True, 1e-12, True, True)
    for tokens, num_shared in ((1, 0), (64, 2), (4096, 0)):
        with s.in_case(f"triton_select_experts T={tokens} shared={num_shared}"):
            fm.triton_select_experts(torch.zeros(tokens, E), router, torch.zeros(E), num_shared)
    # decode-sized batches route in one launch from bf16 x and the fp32 gate (ERNIE); Qwen3-30B-A3B's
    # gate (128 experts, hidden 2048, top-8) is in the model dtype
    for tokens in (1, 16):
        for bias in (torch.zeros(E), None):
            with s.in_case(f"triton_route T={tokens} bias={bias is not None} shared=2"):
                fm.triton_route(zeros(tokens, H), torch.zeros(E, H), router, bias, 2)
    qwen_router = RouterConfig(128, 8, True, 0.0, False, False)
    with s.in_case("triton_route qwen3 bf16 gate T=1"):
        fm.triton_route(zeros(1, 2048), zeros(128, 2048), qwen_router, None, 0)
    # the router's last program also aligning the ids (ROUTE_ALIGN_MAX_TOKENS), at the block_m the
    # GEMMs then take; 8 tokens x (6 + 2 shared) slots is the largest it takes
    for tokens in (1, 8):
        bm = fm.choose_tile_config(tokens * (top_k + 2), E + 2).block_m
        with s.in_case(f"triton_route_align T={tokens} shared=2 block_m={bm}"):
            fm.triton_route_align(zeros(tokens, H), torch.zeros(E, H), router, torch.zeros(E), 2, bm)

    def routing(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = (torch.arange(tokens * top_k, dtype=torch.int32) % E).view(tokens, top_k)  # int32, as the router
        return torch.zeros(tokens, top_k), ids

    w13 = torch.empty(E, 2 * I, H, dtype=bf16)
    w2 = torch.empty(E, H, I, dtype=bf16)
    for tokens in (1, 256, 1024, 4096):  # 1, 24, 96, 384 rows per expert: choose_tile_config's four tile sets
        weights, ids = routing(tokens)
        with s.in_case(f"fused_moe_triton bf16 T={tokens}"):
            fm.fused_moe_triton(zeros(tokens, H), w13, w2, weights, ids)
    # the down GEMM reading its block's routing before the PDL wait (ERNIESERVE_MOE_DOWN_EARLY), and
    # one GEMM block per assignment (ERNIESERVE_MOE_STATIC_ALIGN_MAX_TOKENS: the alignment is given)
    real_down_early = fm.down_early
    fm.down_early = lambda: True
    try:
        weights, ids = routing(1)
        with s.in_case("fused_moe_triton bf16 T=1 down early, one block per assignment"):
            fm.fused_moe_triton(zeros(1, H), w13, w2, weights, ids,
                                alignment=fm.per_assignment_alignment(ids, E, fm.choose_tile_config(top_k, E).block_m))
        # ... and the folded shared experts' gate/up blocks before the wait (ERNIESERVE_MOE_SHARED_EARLY)
        real_shared_early = fm.shared_early
        fm.shared_early = lambda: True
        try:
            align = fm.per_assignment_alignment(ids, E, fm.choose_tile_config(top_k, E).block_m)
            with s.in_case("fused_moe_triton bf16 T=1 shared experts early"):
                fm.fused_moe_triton(zeros(1, H), w13, w2, weights, ids, shared_slots=2, alignment=align)
            for scheme in (fmq.ExpertScheme.WINT8, fmq.ExpertScheme.WINT4):
                experts = fmq.QuantizedExperts.empty(scheme, 0, E, H, I, cpu)
                t = fmq.choose_quant_tiles(top_k, E, experts, cuda)
                with s.in_case(f"fused_moe_quant_triton fused {scheme.value} g0 T=1 shared experts early"):
                    fmq.fused_moe_quant_triton(zeros(1, H), experts, weights, ids, t, path=fmq.QuantMoEPath.FUSED,
                                               alignment=align, shared_slots=2)
        finally:
            fm.shared_early = real_shared_early
        for scheme in (fmq.ExpertScheme.WINT8, fmq.ExpertScheme.WINT4):
            experts = fmq.QuantizedExperts.empty(scheme, 0, E, H, I, cpu)
            t = fmq.choose_quant_tiles(top_k, E, experts, cuda)
            with s.in_case(f"fused_moe_quant_triton fused {scheme.value} g0 T=1 down early"):
                fmq.fused_moe_quant_triton(zeros(1, H), experts, weights, ids, t, path=fmq.QuantMoEPath.FUSED)
    finally:
        fm.down_early = real_down_early
    # the per-assignment GEMVs (moe_gemv.assignment_path): shared experts' programs first, early down reads
    real = fm.shared_early, fm.down_early
    fm.shared_early = fm.down_early = lambda: True
    try:
        for scheme in (fmq.ExpertScheme.WINT8, fmq.ExpertScheme.WINT4):
            experts = fmq.QuantizedExperts.empty(scheme, 0, E, H, I, cpu)
            with s.in_case(f"moe_gemv assignment_path {scheme.value} T=1 shared experts"):
                moe_gemv.assignment_path(zeros(1, H), experts, weights, ids.to(torch.int32), shared_slots=2)
        # int4 without the packed bf16x2 products (ERNIESERVE_MOE_ASSIGN_PACKED=0): the fp32 conversion
        real_packed = moe_gemv.assign_packed
        moe_gemv.assign_packed = lambda: False
        try:
            experts = fmq.QuantizedExperts.empty(fmq.ExpertScheme.WINT4, 0, E, H, I, cpu)
            with s.in_case("moe_gemv assignment_path wint4 fp32 products T=1 shared experts"):
                moe_gemv.assignment_path(zeros(1, H), experts, weights, ids.to(torch.int32), shared_slots=2)
        finally:
            moe_gemv.assign_packed = real_packed
    finally:
        fm.shared_early, fm.down_early = real
    weights, ids = routing(4)
    with s.in_case("fused_moe_triton bf16 foreign_experts"):
        fm.fused_moe_triton(zeros(4, H), w13, w2, weights, ids, foreign_experts=True)

    S = fmq.ExpertScheme
    for scheme, group in ((S.WINT8, 0), (S.WINT8, 128), (S.WINT4, 0), (S.WINT4, 128), (S.FP8, 0), (S.BLOCK_FP8, 0)):
        experts = fmq.QuantizedExperts.empty(scheme, group, E, H, I, cpu)
        tag = f"{scheme.value} g{group}"
        for tokens in (1, 4096):
            weights, ids = routing(tokens)
            x = zeros(tokens, H)
            t = fmq.choose_quant_tiles(tokens * top_k, E, experts, cuda)
            variants = {f"T={tokens} policy down_split={t.down_split}": t}
            if t.down_split > 1:
                variants[f"T={tokens} down_split=1"] = dataclasses.replace(t, down_split=1)
            for label, tt in variants.items():
                with s.in_case(f"fused_moe_quant_triton fused {tag} {label}"):
                    fmq.fused_moe_quant_triton(x, experts, weights, ids, tt, path=fmq.QuantMoEPath.FUSED)
            if scheme.is_fp8:
                # On CUDA tensors the fused path quantizes x [T, H] and the activation [N, I] with
                # fp8_matmul's Triton kernel; on CPU it takes the torch reference: launch it here.
                group_a = fmq._activation_group(scheme)
                with s.in_case(f"fused_moe_quant_triton fused {tag} T={tokens} activation quant"):
                    f8.quant_fp8_per_token_group(x, group_a)
                    f8.quant_fp8_per_token_group(zeros(tokens * top_k, I), group_a)
            elif tokens > 1:
                with s.in_case(f"fused_moe_quant_triton dequant {tag} T={tokens}"):
                    fmq.fused_moe_quant_triton(x, experts, weights, ids, scratch=fmq.DequantScratch(),
                                               path=fmq.QuantMoEPath.DEQUANT)


# ---- compiling -------------------------------------------------------------------------------------

_TO_COMPILE: list[Launch] = []  # read by the (forked) compile workers
_DUMP_DIR: list[Path] = []  # --dump: where each variant's PTX / SASS go (read by the workers)


def compile_one(index: int) -> tuple[bool, str, float]:
    """(ok, message, seconds) for _TO_COMPILE[index]."""
    import triton
    from triton.compiler import ASTSource

    # the launcher compiles with the same default; this only silences Triton 3.9's notice about it
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    launch = _TO_COMPILE[index]
    start = time.perf_counter()
    try:
        src = ASTSource(launch.fn, launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
        kernel = triton.compile(src, target=_target(), options=launch.options)
        if "cubin" not in kernel.asm:
            return False, "no cubin produced", time.perf_counter() - start
        problem = _pdl_problem(launch, kernel.asm.get("ptx", ""))
        if problem:
            return False, problem, time.perf_counter() - start
        shared = kernel.metadata.shared
        if _DUMP_DIR:
            _dump(index, launch, kernel, _DUMP_DIR[0])
        if shared > H100_MAX_SHARED:
            return (False, f"needs {shared} bytes of shared memory; an H100 block has {H100_MAX_SHARED} "
                    "(out of resource at launch)", time.perf_counter() - start)
        return True, f"shared={shared}", time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - every compiler error is a result to report
        text = "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
        cause = exc.__cause__
        while cause is not None:  # the innermost error of a Triton CompilationError is the informative one
            last = cause
            cause = cause.__cause__
        if exc.__cause__ is not None:
            text += "\n" + "".join(traceback.format_exception_only(type(last), last)).rstrip()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 12:  # the first line names the error and its place, the last ones show it
            lines = lines[:1] + ["..."] + lines[-10:]
        return False, "\n".join(lines), time.perf_counter() - start


_GDC_INSTRUCTIONS = ("griddepcontrol.wait", "griddepcontrol.launch_dependents")


def _pdl_problem(launch: Launch, ptx: str) -> str | None:
    """A PDL launch's PTX must wait and launch its dependents; any other launch's must not."""
    pdl = bool(launch.options.get("launch_pdl", False))
    found = [ins for ins in _GDC_INSTRUCTIONS if ins in ptx]
    if pdl and len(found) != len(_GDC_INSTRUCTIONS):
        missing = [ins for ins in _GDC_INSTRUCTIONS if ins not in found]
        return f"launched with launch_pdl, but its PTX has no {', '.join(missing)}"
    if not pdl and found:
        return f"launched without PDL, but its PTX has {', '.join(found)}"
    return None


def _dump(index: int, launch: Launch, kernel: Any, out: Path) -> None:
    """<index>_<kernel>.{txt,ttgir,ptx,sass}: the variant's description, its TritonGPU IR, PTX and
    SASS (cuobjdump of the cubin, from the nvidia backend's own bin/), for reading the compiled code."""
    import subprocess
    import tempfile

    import triton

    stem = out / f"{index:03d}_{launch.fn.__name__}"
    stem.with_suffix(".txt").write_text(f"{launch.name}\n{launch.case}\n{launch.describe()}\n")
    stem.with_suffix(".ttgir").write_text(kernel.asm.get("ttgir", ""))
    stem.with_suffix(".ptx").write_text(kernel.asm["ptx"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    stem.with_suffix(".sass").write_text(sass)


@functools.cache
def _target() -> Any:
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", ARCH, 32)


def helper_names(found: dict[str, Any]) -> set[str]:
    """JIT functions called from another JIT function's source: helpers, not launched on their own."""
    helpers = set()
    for name, fn in found.items():
        short = fn.__name__
        for other_name, other in found.items():
            if other_name != name and f"{short}(" in other.src:
                helpers.add(name)
    return helpers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-j", "--jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each variant's constexprs and options")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    parser.add_argument("--dump", type=Path, default=None,
                        help="write each variant's TTGIR, PTX and SASS into this folder (NNN_kernel.*)")
    parser.add_argument("--specialize", action="store_true",
                        help="specialise integer arguments on their values as the launcher does (== 1, "
                        "divisible by 16): the variants the GPU runs, for reading their code")
    parser.add_argument("--as-recorded", action="store_true",
                        help="keep the CPU (interpreter) values of DOT_FP32 / LIBDEVICE_EXP / precision")
    parser.add_argument("--pdl", choices=("both", "off", "on"), default="both",
                        help="record the launches without programmatic dependent launch (off), with it "
                        "(on: kernels/pdl.py forced on, cases marked [pdl]), or both (default)")
    args = parser.parse_args(argv)

    problem = environment_problem()
    if problem:
        print(f"UNAVAILABLE: {problem}")
        return EXIT_UNAVAILABLE

    start = time.perf_counter()
    session = Session(as_recorded=args.as_recorded, specialize=args.specialize)
    modules = kernel_modules()
    from ernieserve.kernels import pdl

    with recording(session, modules) as found:
        if args.pdl in ("both", "off"):
            run_cases(session)
        if args.pdl in ("both", "on"):
            session.case_suffix = " [pdl]"
            with pdl.override(True):
                run_cases(session)
            session.case_suffix = ""
    record_s = time.perf_counter() - start

    unique: dict[tuple, Launch] = {}
    cases_of: dict[tuple, list[str]] = {}
    for launch in session.launches:
        if args.only and args.only not in launch.name:
            continue
        key = launch.key()
        unique.setdefault(key, launch)
        cases_of.setdefault(key, []).append(launch.case)
    _TO_COMPILE[:] = list(unique.values())
    if args.dump is not None:
        args.dump.mkdir(parents=True, exist_ok=True)
        _DUMP_DIR[:] = [args.dump]
    keys = list(unique)
    num_pdl = sum(1 for x in _TO_COMPILE if x.options.get("launch_pdl"))
    print(f"recorded {len(session.launches)} launches of {len({x.name for x in session.launches})} kernels "
          f"in {record_s:.1f} s: {len(_TO_COMPILE)} distinct variants ({num_pdl} with PDL) to compile for "
          f"sm_{ARCH}", flush=True)

    failures: list[str] = []
    jobs = max(1, min(args.jobs, len(_TO_COMPILE)))
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(compile_one, range(len(_TO_COMPILE)))
    else:
        pool = None
        results = map(compile_one, range(len(_TO_COMPILE)))
    try:
        for i, (ok, message, seconds) in enumerate(results):
            launch = _TO_COMPILE[i]
            cases = cases_of[keys[i]]
            where = cases[0] + (f" (+{len(cases) - 1} more)" if len(cases) > 1 else "")
            status = "ok  " if ok else "FAIL"
            print(f"{status} {seconds:5.1f}s  {launch.name}  <- {where}", flush=True)
            if args.verbose or not ok:
                print(f"        {launch.describe()}")
                if launch.rewrites:
                    print(f"        CUDA values: {', '.join(launch.rewrites)}")
            if not ok:
                failures.append(f"{launch.name}  <- {where}")
                print("        " + message.replace("\n", "\n        "), flush=True)
    finally:
        if pool is not None:
            pool.shutdown()

    for label, tb in session.case_errors:
        failures.append(f"wrapper call {label!r}")
        lines = [ln for ln in tb.rstrip().splitlines() if ln.strip()]
        print(f"FAIL wrapper call {label!r} raised:\n        " + "\n        ".join(lines[-8:]))

    launched = {x.name for x in session.launches}
    helpers = helper_names(found)
    missing = sorted(set(found) - launched - helpers)
    if missing and not args.only:
        print(f"note: never launched by the calls above (not covered): {', '.join(missing)}")

    total = time.perf_counter() - start
    print(f"{len(_TO_COMPILE)} variants compiled for sm_{ARCH}, {len(failures)} failures, {total:.1f} s")
    for failure in failures:
        print(f"  FAILED {failure}")
    return EXIT_FAILED if failures else 0


if __name__ == "__main__":
    sys.exit(main())
