"""nqfmt: the `.nq` file format (GGUF v3 with binary-factored linears), shared by the converter and the runtime.

Never imports torch: the runtime depends on it.
"""
from .bits import path_bits, rank_for_bits
from .config import ModelConfig
from .errors import NQError, NQFormatError
from .layout import HotRows, LinearPlan, TensorSpec
from .metadata import Provenance, TokenizerInfo
from .reader import BinaryPath, FactoredLinear, NQFile, open_nq
from .signs import pack_signs, unpack_signs


def __getattr__(name: str):
    """`nqfmt.NQWriter` is imported on first use: the writer needs the gguf package, whose import costs ~40 ms that a
    runtime, which only reads, should not pay at start-up."""
    if name == "NQWriter":
        from .writer import NQWriter
        return NQWriter
    raise AttributeError(f"module 'nqfmt' has no attribute {name!r}")

__all__ = ["BinaryPath", "FactoredLinear", "HotRows", "LinearPlan", "ModelConfig", "NQError", "NQFile", "NQFormatError",
           "NQWriter", "Provenance", "TensorSpec", "TokenizerInfo", "open_nq", "pack_signs", "path_bits",
           "rank_for_bits", "unpack_signs"]
