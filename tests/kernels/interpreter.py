"""The Triton interpreter for the kernel tests of this folder, which run on CPU tensors.

Triton picks interpreter vs GPU code when @triton.jit decorates a function, triton.language's own
helpers (tl.cdiv, tl.max, ...) included, so the flag must be set before triton is first imported.
Off-GPU nothing but the interpreter can run the kernels, so setting it process-wide is harmless
there; on a GPU machine these tests run only if the caller asked for the interpreter.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch


def interpreted(fn: object) -> bool:
    return "Interpreted" in type(fn).__name__


def require_interpreter() -> ModuleType:
    """triton, imported in interpreter mode; skips the calling test module where it cannot be."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    triton = pytest.importorskip("triton")
    if not interpreted(triton.language.cdiv):
        pytest.skip("triton was imported without TRITON_INTERPRET=1 (by an earlier test module, or on a GPU "
                    "machine); run with TRITON_INTERPRET=1, or set it in tests/conftest.py",
                    allow_module_level=True)
    return triton
