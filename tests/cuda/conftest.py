"""Every kernel test runs twice: on the emulating device (numpy transliterations of the CUDA sources, always) and
on the GPU (skipped where the cuda backend cannot run)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from emulator import EmulatedDevice  # noqa: E402

from runtime.backends import cuda_problem  # noqa: E402


def gpu_backend():
    problem = cuda_problem()
    if problem:
        pytest.skip(f"no GPU: {problem}")
    from runtime.backends.cuda import CudaBackend
    return CudaBackend()


@pytest.fixture(scope="module", params=["emulated", "gpu"])
def backend(request):
    from runtime.backends.cuda import CudaBackend
    return CudaBackend(EmulatedDevice()) if request.param == "emulated" else gpu_backend()


@pytest.fixture(scope="session")
def variant_files(tmp_path_factory):
    """Every tiny architecture variant of tests/runtime/synthetic_variants.py, written once."""
    from synthetic_variants import VARIANTS, write_variant
    root = tmp_path_factory.mktemp("cuda-variants")
    return {v: write_variant(root / f"{v}.nq", v) for v in VARIANTS}
