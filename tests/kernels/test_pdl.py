"""The programmatic-dependent-launch switch (kernels/pdl.py): on by default for a CUDA device of
sm_90+, off with ERNIESERVE_PDL=0 (or false / no / off), and the launch keywords it implies."""

from __future__ import annotations

import pytest
import torch

from ernieserve.kernels import pdl


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):
    """Set ERNIESERVE_PDL (None: unset) with the switch's cached read cleared before and after."""

    def set_env(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(pdl.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(pdl.ENV_VAR, value)
        pdl.env_enabled.cache_clear()

    yield set_env
    pdl.env_enabled.cache_clear()


@pytest.mark.parametrize("value,on", [(None, True), ("", True), ("1", True), ("true", True), (" ON ", True),
                                      ("0", False), ("no", False), ("false", False), (" Off ", False)])
def test_env_values(env, value: str | None, on: bool) -> None:
    env(value)
    assert pdl.env_enabled() is on


def test_env_read_once(env, monkeypatch: pytest.MonkeyPatch) -> None:
    env("0")
    assert not pdl.env_enabled()
    monkeypatch.setenv(pdl.ENV_VAR, "1")  # too late: kernels already chose their variants
    assert not pdl.env_enabled()


@pytest.mark.parametrize("value", [None, "0", "1"])
def test_cpu_device_never(env, value: str | None) -> None:
    env(value)
    assert not pdl.pdl_enabled(torch.device("cpu"))


def test_cuda_device_needs_env_and_hopper(env, monkeypatch: pytest.MonkeyPatch) -> None:
    capability = {"cap": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability["cap"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    pdl._device_capable.cache_clear()
    try:
        dev = torch.device("cuda", 0)
        env("0")
        assert not pdl.pdl_enabled(dev), "ERNIESERVE_PDL=0 turns it off"
        env(None)  # on by default where the Triton can launch it
        assert pdl.pdl_enabled(dev) is pdl._triton_has_launch_pdl()
        assert pdl.pdl_enabled(torch.device("cuda")) is pdl._triton_has_launch_pdl()  # no index: current
        capability["cap"] = (8, 0)  # Ampere: no griddepcontrol
        pdl._device_capable.cache_clear()
        assert not pdl.pdl_enabled(dev)
        capability["cap"] = (10, 0)
        pdl._device_capable.cache_clear()
        assert pdl.pdl_enabled(dev) is pdl._triton_has_launch_pdl()
        monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm reports "cuda" devices and gfx9 as 9.x
        pdl._device_capable.cache_clear()
        assert not pdl.pdl_enabled(dev)
    finally:
        pdl._device_capable.cache_clear()


def test_override_wins_and_nests(env) -> None:
    env(None)
    cpu = torch.device("cpu")
    with pdl.override(True):
        assert pdl.pdl_enabled(cpu)
        with pdl.override(False):
            assert not pdl.pdl_enabled(cpu)
        assert pdl.pdl_enabled(cpu)
    assert not pdl.pdl_enabled(cpu)


def test_launch_keywords() -> None:
    assert pdl.pdl_launch(False) == {}  # off: the launch is exactly the pre-PDL one
    assert pdl.pdl_launch(True) == {"PDL": True, "launch_pdl": True}


def test_triton_knows_the_launch_option() -> None:
    """The Triton this runs with has the launch option and the intrinsics (3.4+; 3.6 on the GPU
    machine, 3.9 here). Without them pdl_enabled stays False and the kernels still compile."""
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        pytest.skip("triton has no nvidia backend")
    assert "launch_pdl" in CUDAOptions.__dataclass_fields__
    assert pdl.HAS_GDC and pdl._triton_has_launch_pdl()
