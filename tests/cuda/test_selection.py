"""Backend selection: `--backend cuda` names what is missing in one line; `auto` falls back to numba without
importing CuPy where it is absent (the driver is asked through libcuda, not CuPy)."""
from __future__ import annotations

import importlib.util
import sys

import pytest

import runtime.backends as backends
from runtime.backends import BackendUnavailable, get_backend


@pytest.fixture
def no_cupy(monkeypatch):
    """CuPy absent: find_spec finds nothing and any import of it fails loudly."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    monkeypatch.setitem(sys.modules, "cupy", None)


def present(monkeypatch, devices):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "cupy" else real(name, *a))
    monkeypatch.setattr(backends, "_driver_devices", lambda: devices)


def test_cuda_without_cupy_says_how_to_install(no_cupy):
    with pytest.raises(BackendUnavailable) as e:
        get_backend("cuda")
    assert "CuPy is not installed" in str(e.value) and "pip install 'nanoquant[cuda]'" in str(e.value)
    assert "\n" not in str(e.value)


def test_auto_without_cupy_picks_numba_without_importing_it(no_cupy):
    assert get_backend("auto", threads=1).name == "numba"


@pytest.mark.parametrize("devices,words", [(None, "no NVIDIA driver"), (0, "reports no usable GPU")])
def test_cuda_without_driver_or_device(monkeypatch, devices, words):
    present(monkeypatch, devices)
    with pytest.raises(BackendUnavailable, match=words):
        get_backend("cuda")
    assert get_backend("auto", threads=1).name == "numba"


def test_cuda_with_a_device_builds_the_backend(monkeypatch):
    present(monkeypatch, 1)
    built = []

    class Fake:
        name = "cuda"

        def __init__(self):
            built.append(self)

    import runtime.backends.cuda as cuda
    monkeypatch.setattr(cuda, "CudaBackend", Fake)
    assert get_backend("cuda") is built[0] and get_backend("auto") is built[1]


def test_cupy_failing_to_start_is_one_line(monkeypatch):
    present(monkeypatch, 1)
    import runtime.backends.cuda as cuda

    def broken():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient\nmore detail")
    monkeypatch.setattr(cuda, "CudaBackend", broken)
    with pytest.raises(BackendUnavailable) as e:
        get_backend("cuda")
    assert "cudaErrorInsufficientDriver" in str(e.value) and "\n" not in str(e.value)
