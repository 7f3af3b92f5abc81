"""nqfmt: the `.nq` file format (GGUF v3 with binary-factored linears), shared by the converter and the runtime.

Never imports torch: the runtime depends on it.
"""
from .bits import path_bits, rank_for_bits
from .config import ModelConfig
from .errors import NQFormatError
from .layout import LinearPlan, TensorSpec
from .metadata import Provenance, TokenizerInfo
from .reader import BinaryPath, FactoredLinear, NQFile, open_nq
from .signs import pack_signs, unpack_signs
from .writer import NQWriter

__all__ = ["BinaryPath", "FactoredLinear", "LinearPlan", "ModelConfig", "NQFile", "NQFormatError", "NQWriter",
           "Provenance", "TensorSpec", "TokenizerInfo", "open_nq", "pack_signs", "path_bits", "rank_for_bits",
           "unpack_signs"]
