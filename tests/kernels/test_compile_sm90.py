"""Every Triton kernel the project's wrappers launch compiles for Hopper (sm_90), with no GPU.

The other kernel tests run the kernels in Triton's interpreter, which accepts programs the real
compiler refuses (`tl.atomic_xchg` on a bf16 pointer: fine there, a CompilationError on the H100).
tests/kernels/compile_sm90.py records the launches the wrappers make at production dtypes and tile
policies and compiles each distinct one to a cubin for sm_90 (ptxas included). It must run in a
process where triton was imported without TRITON_INTERPRET (this one set it in tests/conftest.py),
hence the subprocess. The script's default (`--pdl both`) compiles every launch without and with
programmatic dependent launch (kernels/pdl.py) and checks each variant's PTX for the
`griddepcontrol` instructions: about 3 minutes on 2 CPU cores with a cold Triton cache, a few
seconds warm.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "kernels" / "compile_sm90.py"
EXIT_UNAVAILABLE = 77  # compile_sm90.EXIT_UNAVAILABLE


def _cannot_compile_for_sm90() -> str | None:
    """Why this machine cannot compile for sm_90 (checked here, in interpreter mode: triton's
    backends and tools are there all the same), or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from triton.backends import backends

    if "nvidia" not in backends:
        return f"triton has no nvidia backend (backends: {sorted(backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001 - whatever the reason, there is no ptxas for sm_90
        return f"triton's nvidia backend has no ptxas for sm_90 ({exc})"
    return None


def test_every_launched_kernel_compiles_for_sm90() -> None:
    reason = _cannot_compile_for_sm90()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode == EXIT_UNAVAILABLE:
        pytest.skip(output.splitlines()[-1] if output else "compile_sm90.py: cannot compile for sm_90 here")
    if proc.returncode != 0:
        pytest.fail(f"{SCRIPT.relative_to(REPO)} exited with {proc.returncode}: kernels that do not compile "
                    f"for sm_90 are marked FAIL\n\n{output}", pytrace=False)
