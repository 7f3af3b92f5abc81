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
        if self.gtype in K.BLOCK_TYPES:
            return np.dtype(np.uint8)
        return np.dtype({GGMLType.F16: np.float16, GGMLType.F32: np.float32, GGMLType.I32: np.uint32}[self.gtype])

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """Shape of that array (block types: raw bytes, e.g. 34 per block of 32 for Q8_0, 18 for Q4_0 and IQ4_NL)."""
        if self.gtype in K.BLOCK_TYPES:
            block, size = K.TYPE_SIZES[self.gtype]
            return (*self.shape[:-1], self.shape[-1] // block * size)
        return self.shape


@dataclass(frozen=True)
class LinearPlan:
    """Ranks of a factored linear's binary paths (path 0 first) and whether its paths carry `scale_mid`."""

    ranks: tuple[int, ...]
    has_mid: bool = False


@dataclass(frozen=True)
class HotRows:
    """A 4-bit table with the rows of its `rows` most frequent tokens stored apart at Q8_0 (spec §3.4)."""

    gtype: GGMLType  # of the other rows: Q4_0 or IQ4_NL
    rows: int


# How an embedding table / output head is stored: dense in a GGML type, dense with hot rows, or binary-factored
TableKind = GGMLType | HotRows | LinearPlan


def path_specs(name, m: int, n: int, r: int, has_mid: bool) -> list[TensorSpec]:
    """The parts of one binary path, `name(part)` naming each: V signs (r×n), U signs (m×r), scales."""
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
        specs += factored_specs(f"blk.{layer}.{linear}", lambda p, part: K.path_tensor(layer, linear, p, part),
                                m, n, plan)
        if config.attention_bias and linear in K.BIASED_LINEARS:
            specs.append(TensorSpec(K.bias_tensor(layer, linear), (m,), K.BIAS_TYPE))
    return specs


def factored_specs(label: str, name, m: int, n: int, plan: LinearPlan) -> list[TensorSpec]:
    """The tensors of a binary-factored m×n matrix (a decoder linear or a table), `name(path, part)` naming each."""
    if not 1 <= len(plan.ranks) <= K.MAX_PATHS:
        raise NQFormatError(f"{label}: {len(plan.ranks)} binary paths (1 to {K.MAX_PATHS} allowed)")
    specs = []
    for p, r in enumerate(plan.ranks):
        if not 1 <= r <= min(m, n):
            raise NQFormatError(f"{label}.p{p}: rank {r} outside 1..min(m, n) = {min(m, n)}")
        specs += path_specs(lambda part: name(p, part), m, n, r, plan.has_mid)
    return specs


def table_specs(config: ModelConfig, table: str, kind: TableKind) -> list[TensorSpec]:
    """The tensors of the embedding (`table` = K.EMBD_TABLE) or untied head (K.OUTPUT_TABLE), V×d (spec §3.4)."""
    v, d = config.vocab, config.hidden
    if isinstance(kind, LinearPlan):
        return factored_specs(table, lambda p, part: K.table_path_tensor(table, p, part), v, d, kind)
    name = K.dense_table_tensor(table)
    if isinstance(kind, HotRows):
        if kind.gtype not in K.Q4_TYPES or not 1 <= kind.rows < v:
            raise NQFormatError(f"{name}: hot rows need a 4-bit type and 1 to {v - 1} rows, got "
                                f"{GGMLType(kind.gtype).name} with {kind.rows}")
        table_specs(config, table, kind.gtype)  # the 4-bit type's own checks
        return [TensorSpec(name, (v - kind.rows, d), kind.gtype),
                TensorSpec(K.hot_rows_tensor(table), (kind.rows, d), K.HOT_ROWS_TYPE),
                TensorSpec(K.hot_ids_tensor(table), (kind.rows,), GGMLType.I32)]
    if kind not in K.EMBEDDING_TYPES:
        raise NQFormatError(f"{name}: type {GGMLType(kind).name} not allowed")
    if kind in K.BLOCK_TYPES and d % 32:
        raise NQFormatError(f"{name}: {kind.name} needs a hidden size divisible by 32, got {d}")
    return [TensorSpec(name, (v, d), kind)]


def file_specs(config: ModelConfig, linears: list[dict[str, LinearPlan]], embedding_type: TableKind = GGMLType.F16,
               output_type: TableKind | None = None) -> list[TensorSpec]:
    """Every tensor of a file in order, the trailing checksum table included. `output_type` (untied models only)
    defaults to `embedding_type`; it must be of the same kind, and of the same type when dense."""
    if len(linears) != config.n_layers:
        raise NQFormatError(f"plan has {len(linears)} blocks, config has {config.n_layers}")
    specs = table_specs(config, K.EMBD_TABLE, embedding_type)
    for layer, plan in enumerate(linears):
        specs += block_specs(config, layer, plan)
    specs.append(TensorSpec(K.OUTPUT_NORM, (config.hidden,), K.NORM_TYPE))
    if not config.tie_embeddings:
        output_type = embedding_type if output_type is None else output_type
        if isinstance(output_type, LinearPlan) != isinstance(embedding_type, LinearPlan) or (
                not isinstance(output_type, LinearPlan) and output_type != embedding_type):
            raise NQFormatError(f"the output head ({table_kind_name(output_type)}) must be stored as the embedding is "
                                f"({table_kind_name(embedding_type)})")
        specs += table_specs(config, K.OUTPUT_TABLE, output_type)
    specs.append(TensorSpec(K.CHECKSUMS, (len(specs) + 1,), GGMLType.I32))
    return specs


def is_scale(name: str) -> bool:
    """Scale tensors must hold finite values; both sides check."""
    return name.rsplit(".", 1)[-1] in (K.SCALE_IN, K.SCALE_OUT, K.SCALE_MID)


def is_hot_ids(name: str) -> bool:
    return name in (K.hot_ids_tensor(K.EMBD_TABLE), K.hot_ids_tensor(K.OUTPUT_TABLE))


def hot_ids_valid(ids: np.ndarray, vocab: int) -> bool:
    """Hot row ids must be strictly increasing token ids (spec §3.4); both sides check."""
    ids = np.asarray(ids).astype(np.int64)
    return not ids.size or bool(ids[0] >= 0 and ids[-1] < vocab and np.all(np.diff(ids) > 0))


def cold_ids(hot_ids: np.ndarray, vocab: int) -> np.ndarray:
    """The tokens whose rows a hot-row table's 4-bit part holds, in its row order (spec §3.4): every token that is
    not hot, increasing, as int64."""
    is_hot = np.zeros(vocab, bool)
    is_hot[np.asarray(hot_ids, np.int64)] = True
    return np.flatnonzero(~is_hot)


def is_signs(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in (K.V_SIGNS, K.U_SIGNS)


def table_kind_name(kind: TableKind) -> str:
    """`Q4_0`, `F16`, ... or `binary-factored, ranks [r0, r1]`: how nqinfo and errors name a table's kind."""
    if isinstance(kind, HotRows):
        return f"{GGMLType(kind.gtype).name} + {kind.rows} {K.HOT_ROWS_TYPE.name} rows"
    return f"binary-factored, ranks {list(kind.ranks)}" if isinstance(kind, LinearPlan) else GGMLType(kind).name


def sign_columns(spec_name: str, config: ModelConfig, linears: list[dict[str, LinearPlan]],
                 tables: dict[str, TableKind]) -> int:
    """Number of meaningful columns in a packed sign tensor (the rest of its last word must be zero). `tables` maps
    K.EMBD_TABLE / K.OUTPUT_TABLE to their kinds."""
    parts = spec_name.split(".")
    if len(parts) == 3:  # token_embd.pP.part / output.pP.part: a V×d table
        table, path, part = parts
        plan, n = tables[table], config.hidden
    else:
        _, layer, linear, path, part = parts
        plan, n = linears[int(layer)][linear], config.linear_shape(linear)[1]
    return n if part == K.V_SIGNS else plan.ranks[int(path[1:])]
