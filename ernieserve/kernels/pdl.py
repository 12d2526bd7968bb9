"""Programmatic dependent launch (PDL) for the decode path's small Triton kernels: one switch.

On Hopper (sm_90) and later a kernel launched with the programmatic-stream-serialization attribute
(Triton's launch option ``launch_pdl=True``) may start while the kernel before it in the stream is
still running: its programs are resident and run their prologue (index math, loads of static data)
and then block in ``griddepcontrol.wait`` (`gdc_wait`) until the previous kernel has completed and
its writes are visible. The previous kernel lets it launch early by ``griddepcontrol.launch_dependents``
(`gdc_launch_dependents`). Under CUDA graph capture (CUDA >= 12.3) such launches become programmatic
edges, so a replayed decode step hides part of each launch gap and prologue of its 2-8 us kernels.

Rules every kernel taking a ``PDL: tl.constexpr`` here follows (its wrapper passes
``**pdl_launch(pdl_enabled(device))``: ``PDL=True, launch_pdl=True``, or nothing):

* `pdl_wait(PDL)` (the wait, then the launch of dependents) comes before the first load of anything
  an earlier kernel may have written (activations, the KV cache, positions and slots, routing
  outputs, the MoE align's `total` / `sorted_ids`, the split-K tile counters of kernels/split_k.py)
  and before the first store. Only static data (weights, norm weights, the router's gate) is loaded
  before it.
* It runs unconditionally, on every path (before any early `return`): a kernel that could finish
  without waiting would let the next one's wait return while the one before is still running.
* Kernels that do not use PDL (cuBLAS, torch ops, the other Triton kernels) are launched as always
  and so start after everything before them has completed: mixing both kinds is safe.

`pdl_enabled(device)`: a CUDA (not ROCm) device of compute capability >= 9.0, a Triton with the
``launch_pdl`` option and the `gdc_*` intrinsics, and ``ERNIESERVE_PDL`` not set to 0 / false / no /
off in the environment (read once per process). On by default: on an H100 it took the 21B-A3B
batch-1 decode step from 3.325 to 3.208 ms, wint4's from 2.258 to 2.032 ms (docs/performance.md,
with the same bits: tests/gpu/test_pdl_gpu.py). `override(True/False)` forces the
answer (tests; tests/kernels/compile_sm90.py compiles the PDL variants of the launches it records
on CPU tensors that way). With PDL off every kernel compiles exactly as before: the constexpr
prunes the wait, and no launch option is passed.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

ENV_VAR = "ERNIESERVE_PDL"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs without triton
    HAS_TRITON = False

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # no triton, or one older than the gdc intrinsics (Triton 3.4)
    HAS_GDC = False

_OVERRIDE: list[bool] = []  # a stack; the last entry, if any, is the answer


@functools.cache
def env_enabled() -> bool:
    """ERNIESERVE_PDL is unset or anything but 0 / false / no / off (read once: the kernels' variants
    must not change mid-run)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _triton_has_launch_pdl() -> bool:
    if not HAS_GDC:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__


@functools.cache
def _device_capable(index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether the kernels launched on `device` use PDL (see the module docstring)."""
    if _OVERRIDE:
        return _OVERRIDE[-1]
    if device.type != "cuda" or not env_enabled() or not _triton_has_launch_pdl():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_capable(index)


def pdl_launch(enabled: bool) -> dict[str, bool]:
    """The launch keywords of a kernel with a ``PDL`` constexpr: ``PDL=True, launch_pdl=True`` when
    enabled, else none at all (the constexpr's default False and Triton's default launch)."""
    return {"PDL": True, "launch_pdl": True} if enabled else {}


@contextlib.contextmanager
def override(enabled: bool) -> Iterator[None]:
    """pdl_enabled() answers `enabled` for every device inside the block (nestable)."""
    _OVERRIDE.append(bool(enabled))
    try:
        yield
    finally:
        _OVERRIDE.pop()


if HAS_GDC:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """With PDL: wait for the previous kernel (all its writes visible), then let the next kernel
        launch. Call it once per program, unconditionally, before the first load of data an earlier
        kernel wrote and before the first store. Without PDL: nothing (the branch is pruned)."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

elif HAS_TRITON:  # a Triton without the gdc intrinsics: pdl_enabled() is False, the kernels compile

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        pass
