"""The tensor plan: which tensors a file for a given config and ranks holds, with their shapes and types, in file order.

Writer and reader share it, so "missing", "unexpected" and "wrong shape" mean the same thing on both sides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from . import keys as K
from .config import ModelConfig
from .errors import NQFormatError
from .signs import words_per_row

GGMLType = K.GGMLType


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: name, shape in numpy order (rows first; for Q8_0 in elements), and GGML type."""

    name: str
    shape: tuple[int, ...]
    gtype: GGMLType

    @property
    def nbytes(self) -> int:
        block, size = K.TYPE_SIZES[self.gtype]
        return math.prod(self.shape) // block * size

    @property
    def numpy_dtype(self) -> np.dtype:
        """dtype of the array a caller hands the writer and gets from the reader (packed signs: uint32)."""
        return np.dtype({GGMLType.F16: np.float16, GGMLType.F32: np.float32, GGMLType.I32: np.uint32, GGMLType.Q8_0: np.uint8}[self.gtype])

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """Shape of that array (Q8_0: raw bytes, 34 per block of 32)."""
        if self.gtype == GGMLType.Q8_0:
            block, size = K.TYPE_SIZES[GGMLType.Q8_0]
            return (*self.shape[:-1], self.shape[-1] // block * size)
        return self.shape


@dataclass(frozen=True)
class LinearPlan:
    """Ranks of a factored linear's binary paths (path 0 first) and whether its paths carry `scale_mid`."""

    ranks: tuple[int, ...]
    has_mid: bool = False


def path_specs(layer: int, linear: str, path: int, m: int, n: int, r: int, has_mid: bool) -> list[TensorSpec]:
    """The parts of one binary path: V signs (r×n), U signs (m×r), scales."""
    name = lambda part: K.path_tensor(layer, linear, path, part)  # noqa: E731
    specs = [TensorSpec(name(K.V_SIGNS), (r, words_per_row(n)), K.SIGN_TYPE),
             TensorSpec(name(K.U_SIGNS), (m, words_per_row(r)), K.SIGN_TYPE),
             TensorSpec(name(K.SCALE_IN), (n,), K.SCALE_TYPE),
             TensorSpec(name(K.SCALE_OUT), (m,), K.SCALE_TYPE)]
    if has_mid:
        specs.append(TensorSpec(name(K.SCALE_MID), (r,), K.SCALE_TYPE))
    return specs


def block_specs(config: ModelConfig, layer: int, linears: dict[str, LinearPlan]) -> list[TensorSpec]:
    """All tensors of one decoder block, in file order: norms, then each linear's paths and bias."""
    specs = [TensorSpec(K.norm_tensor(layer, nm), (config.norm_length(nm),), K.NORM_TYPE)
             for nm in config.block_norms()]
    for linear in K.LINEARS:
        if linear not in linears:
            raise NQFormatError(f"no plan for blk.{layer}.{linear}")
        plan = linears[linear]
        m, n = config.linear_shape(linear)
        if not 1 <= len(plan.ranks) <= K.MAX_PATHS:
            raise NQFormatError(f"blk.{layer}.{linear}: {len(plan.ranks)} binary paths (1 to {K.MAX_PATHS} allowed)")
        for p, r in enumerate(plan.ranks):
            if not 1 <= r <= min(m, n):
                raise NQFormatError(f"blk.{layer}.{linear}.p{p}: rank {r} outside 1..min(m, n) = {min(m, n)}")
            specs += path_specs(layer, linear, p, m, n, r, plan.has_mid)
        if config.attention_bias and linear in K.BIASED_LINEARS:
            specs.append(TensorSpec(K.bias_tensor(layer, linear), (m,), K.BIAS_TYPE))
    return specs


def file_specs(config: ModelConfig, linears: list[dict[str, LinearPlan]],
               embedding_type: GGMLType = GGMLType.F16) -> list[TensorSpec]:
    """Every tensor of a file in order, the trailing checksum table included."""
    if len(linears) != config.n_layers:
        raise NQFormatError(f"plan has {len(linears)} blocks, config has {config.n_layers}")
    if embedding_type not in K.EMBEDDING_TYPES:
        raise NQFormatError(f"{K.TOKEN_EMBD}: type {embedding_type.name} not allowed")
    if embedding_type == GGMLType.Q8_0 and config.hidden % 32:
        raise NQFormatError(f"{K.TOKEN_EMBD}: Q8_0 needs a hidden size divisible by 32, got {config.hidden}")
    specs = [TensorSpec(K.TOKEN_EMBD, (config.vocab, config.hidden), embedding_type)]
    for layer, plan in enumerate(linears):
        specs += block_specs(config, layer, plan)
    specs.append(TensorSpec(K.OUTPUT_NORM, (config.hidden,), K.NORM_TYPE))
    if not config.tie_embeddings:
        specs.append(TensorSpec(K.OUTPUT, (config.vocab, config.hidden), embedding_type))
    specs.append(TensorSpec(K.CHECKSUMS, (len(specs) + 1,), GGMLType.I32))
    return specs


def is_scale(name: str) -> bool:
    """Scale tensors must hold finite values; both sides check."""
    return name.rsplit(".", 1)[-1] in (K.SCALE_IN, K.SCALE_OUT, K.SCALE_MID)


def is_signs(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in (K.V_SIGNS, K.U_SIGNS)


def sign_columns(spec_name: str, config: ModelConfig, linears: list[dict[str, LinearPlan]]) -> int:
    """Number of meaningful columns in a packed sign tensor (the rest of its last word must be zero)."""
    _, layer, linear, path, part = spec_name.split(".")
    _, n = config.linear_shape(linear)
    return n if part == K.V_SIGNS else linears[int(layer)][linear].ranks[int(path[1:])]
