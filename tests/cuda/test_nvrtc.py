"""Every kernel instantiation compiles with NVRTC for sm_80 and sm_90 without a single warning. NVRTC runs
without a GPU or driver (through cupy_backends), so CI checks this on every commit."""
import pytest

from runtime import kernels

nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (the test extra) is not installed")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_without_warnings(arch):
    names = kernels.name_expressions()
    prog = nvrtc.createProgram(kernels.source(), "nanoquant.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *kernels.OPTIONS])
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(prog))
        log = nvrtc.getProgramLog(prog).strip()
        assert log == "", log
        lowered = [nvrtc.getLoweredName(prog, name) for name in names]
        assert len(set(lowered)) == len(names)
        assert len(nvrtc.getCUBIN(prog)) > 0
    finally:
        nvrtc.destroyProgram(prog)


def test_a_broken_kernel_fails_with_its_log():
    prog = nvrtc.createProgram(kernels.source() + "\n__global__ void broken() { int unused; }\n", "x.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["-arch=sm_90", *kernels.OPTIONS])
        assert "declared but never referenced" in nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def test_every_instantiation_has_a_transliteration():
    from emulator import KERNELS
    assert set(KERNELS) == set(kernels.name_expressions())


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_no_kernel_spills_registers(arch):
    """ptxas's resource report (-v): no kernel spills registers to local memory. (A stack frame alone is allowed:
    libdevice's float64 cos/sin keeps one for its large-argument reduction in rope_table.)"""
    prog = nvrtc.createProgram(kernels.source(), "nanoquant.cu", [], [])
    try:
        for name in kernels.name_expressions():
            nvrtc.addNameExpression(prog, name)
        nvrtc.compileProgram(prog, [f"-arch={arch}", *kernels.OPTIONS, "--ptxas-options=-v"])
        log = nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)
    import re
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert frames and all(stores == loads == "0" for _, stores, loads in frames), log
