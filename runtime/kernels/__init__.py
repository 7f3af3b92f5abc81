"""The CUDA C++ kernels of the cuda backend (runtime/backends/cuda.py), compiled at first use by NVRTC through
cupy.RawModule and cached on disk by CuPy. They include no CUDA headers, so NVRTC alone compiles them.

Files (concatenated in this order into one module): common.cuh (bfloat16 digits, sign expansion, the mma, block
reductions, phase tickets), tables.cuh (embedding/head row readers), binary.cu (binary linears), layers.cu,
attention.cu, head.cu (head and token selection). Layout constants live in the sources as `#define`s;
`constants()` reads them, so Python and CUDA never disagree.
"""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from nqfmt.keys import GGMLType

FILES = ("common.cuh", "tables.cuh", "binary.cu", "layers.cu", "attention.cu", "head.cu")
OPTIONS: tuple[str, ...] = ()  # NVRTC 12 compiles C++17 by default; CuPy adds the architecture

# Row readers of tables.cuh per storage type, each with the elements it reads at once; the first whose count
# divides the hidden size is used.
TABLE_READERS: dict[GGMLType, tuple[tuple[str, int], ...]] = {
    GGMLType.F16: (("F16x8", 8), ("F16x1", 1)),
    GGMLType.F32: (("F32x4", 4), ("F32x1", 1)),
    GGMLType.Q8_0: (("Q8_0", 32),),
    GGMLType.Q4_0: (("Q4_0", 32),),
    GGMLType.IQ4_NL: (("IQ4_NL", 32),),
}

_PLAIN_KERNELS = ("repack_signs", "binary_gemv", "binary_gemm", "rms_norm", "rope_table", "rope", "kv_store",
                  "glu<false>", "glu<true>", "attention", "penalize", "mark_seen", "argmax", "topk")


@cache
def source() -> str:
    """All kernel files as one translation unit, with #line markers so compiler messages name the right file."""
    here = Path(__file__).parent
    return "".join(f'#line 1 "{name}"\n' + (here / name).read_text() + "\n" for name in FILES)


def name_expressions() -> tuple[str, ...]:
    """Every kernel instantiation the backend launches."""
    readers = [name for options in TABLE_READERS.values() for name, _ in options]
    return _PLAIN_KERNELS + tuple(f"embed<{r}>" for r in readers) + tuple(f"head<{r}>" for r in readers)


def table_reader(gtype: GGMLType, hidden: int) -> tuple[str, int]:
    """The reader (name, elements per read) for a table of `gtype` rows of `hidden` values."""
    for name, block in TABLE_READERS.get(gtype, ()):
        if hidden % block == 0:
            return name, block
    raise KeyError(f"no CUDA reader for {gtype.name} tables of width {hidden}")


@cache
def constants() -> dict[str, int]:
    """The integer `#define`s of the sources (tile sizes, thread counts)."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define (\w+) (\d+)\s*$", source(), re.M)}
