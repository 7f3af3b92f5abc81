"""Numba CPU kernels of the compact embedding / head kinds (spec/FORMAT.md §3.4), the fast twins of numpy_ref.py's:
4-bit block rows (Q4_0 and IQ4_NL: an F16 scale d and 16 bytes of nibbles per 32 values, value = d·grid[q]) and the
rows of a binary-factored table.

On AVX-512 the 4-bit head is numba_lut16's (codes repacked at load, looked up 16 rows at a time by vpermps);
elsewhere the head for one token keeps 32 float32 lanes per row, one per position in a block, adds d·grid[q]·x into them
block by block and sums the lanes once per row (as the Q8_0 head does). Where the CPU has SSSE3 (every x86-64 CPU with
AVX) a block's 32 codes become their grid values by two byte shuffles (`pshufb`, the grid as 16 int8 values; the
grid-indexed float loads it replaces do not vectorize); elsewhere (ARM) they are read through the float grid. Several
tokens widen each row once into a buffer (by the same shuffles where there are) and dot it with every token. The block
scales are widened to float32 once at load. A binary-factored head is a factored linear with m = vocabulary: the
backend runs it through the decode and lanes kernels of numba_kernels.py.

Built twice like numba_kernels' row kernels: SERIAL (plain loops) and PARALLEL (prange over row blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nqfmt import FactoredLinear, unpack_signs
from nqfmt.keys import GGMLType
from nqfmt.q4 import GRIDS

from . import numba_lut16 as lut16
from .numba_lut16 import _data
from . import numba_int8 as int8

_OPTS = dict(fastmath=True, cache=True, nogil=True)
Q4_BLOCK_BYTES = 18
ROW_BLOCK = 64  # vocabulary rows per task


@dataclass(frozen=True)
class Q4Table:
    """A Q4_0 or IQ4_NL table as the kernels read it: the file's bytes (V, d/32·18), its block scales widened to
    float32 once at load (V, d/32; 2/9 of the table's size, keeping the F16 decoding out of the inner loops) and the
    type's 16 grid values as float32."""

    raw: np.ndarray
    scales: np.ndarray
    grid: np.ndarray
    hidden: int
    tiles: tuple[np.ndarray, np.ndarray] | None  # codes and scales repacked for the LUT-16 or int8 head, else None
    lut: np.ndarray  # the grid as the int8 head's byte table (numba_int8.grid_lut)
    codes: np.ndarray  # the grid as 16 int8 values (the pshufb head's table)


def q4_table(raw: np.ndarray, gtype: GGMLType, hidden: int, tiles: bool) -> Q4Table:
    rows = raw.shape[0]
    scales = np.ascontiguousarray(raw.reshape(rows, -1, Q4_BLOCK_BYTES)[:, :, :2]).view(np.float16)[:, :, 0]
    scales = scales.astype(np.float32)
    return Q4Table(raw, scales, GRIDS[gtype].astype(np.float32), hidden, lut16.repack_q4(raw, scales) if tiles else None,
                   int8.grid_lut(gtype), GRIDS[gtype].astype(np.int8))


@njit(inline="always", **_OPTS)
def _q4_row(raw, scales, grid, row, out):
    """Row `row` of a 4-bit table widened to float32 into out (d,)."""
    for b in range(scales.shape[1]):
        o = b * Q4_BLOCK_BYTES + 2
        s = scales[row, b]
        for k in range(16):
            q = np.int32(raw[row, o + k])
            out[b * 32 + k] = s * grid[q & np.int32(15)]
            out[b * 32 + 16 + k] = s * grid[q >> np.int32(4)]


@njit(inline="always", **_OPTS)
def _q4_dot(raw, scales, grid, v, x, lane):
    """4-bit row v · x, summed into 32 lanes (one per position in a block) across the row's blocks and reduced once
    at the end; the nibbles are indexed through int32 (int64 arithmetic does not vectorize here)."""
    for k in range(32):
        lane[k] = 0.0
    for b in range(scales.shape[1]):
        o = b * Q4_BLOCK_BYTES + 2
        s = scales[v, b]
        for k in range(16):
            q = np.int32(raw[v, o + k])
            lane[k] += s * grid[q & np.int32(15)] * x[b * 32 + k]
            lane[16 + k] += s * grid[q >> np.int32(4)] * x[b * 32 + 16 + k]
    total = np.float32(0.0)
    for k in range(32):
        total += lane[k]
    return total


_B16 = ir.VectorType(ir.IntType(8), 16)
_F16 = ir.VectorType(ir.FloatType(), 16)
_I16 = ir.VectorType(ir.IntType(32), 16)


def ssse3() -> bool:
    """Whether this CPU has SSSE3's byte shuffle (every x86-64 CPU with AVX; none elsewhere), as LLVM sees the host."""
    from llvmlite import binding
    return bool(binding.get_host_cpu_features().get("ssse3", False))


def _q4_row_types(raw, scales, codes, v, vec) -> bool:
    """The argument types of the pshufb row kernels: C arrays (read-only views of the file welcome), a row index."""
    def c_array(a, dtype, ndim):
        return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == ndim and a.layout == "C"

    return (c_array(raw, types.uint8, 2) and c_array(scales, types.float32, 2) and c_array(codes, types.int8, 1)
            and isinstance(v, types.Integer) and c_array(vec, types.float32, 1))


def _q4_row_blocks(context, builder, signature, args, block) -> None:
    """The loop over the blocks of row args[3] of a 4-bit table (args: raw, scales, codes, v, vec): per block the 16
    code bytes' low and high nibbles become int8 grid values by one `pshufb` each, widened to float32; then
    block(b, halves, scale) with halves the two <16 x float> of positions 0-15 and 16-31 and the block's scale in
    every lane."""
    ty = signature.args
    intp = context.get_value_type(types.intp)
    shuffle = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_B16, [_B16, _B16]),
                                             "llvm.x86.ssse3.pshuf.b.128")
    nb = builder.extract_value(context.make_array(ty[1])(context, builder, args[1]).shape, 1)
    row = context.cast(builder, args[3], ty[3], types.intp)
    lut = builder.load(builder.bitcast(_data(context, builder, ty[2], args[2]), _B16.as_pointer()), align=1)
    raw_row = builder.gep(_data(context, builder, ty[0], args[0]),
                          [builder.mul(row, builder.mul(nb, ir.Constant(intp, Q4_BLOCK_BYTES)))])
    scale_row = builder.gep(_data(context, builder, ty[1], args[1]), [builder.mul(row, nb)])
    low = ir.Constant(_B16, [15] * 16)
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        at = builder.add(builder.mul(b, ir.Constant(intp, Q4_BLOCK_BYTES)), ir.Constant(intp, 2))
        code = builder.load(builder.bitcast(builder.gep(raw_row, [at]), _B16.as_pointer()), align=1)
        one = builder.insert_element(ir.Constant(_F16, ir.Undefined), builder.load(builder.gep(scale_row, [b])),
                                     ir.Constant(ir.IntType(32), 0))
        scale = builder.shuffle_vector(one, ir.Constant(_F16, ir.Undefined), ir.Constant(_I16, [0] * 16))
        halves = [builder.sitofp(builder.call(shuffle, [lut, nibbles]), _F16)
                  for nibbles in (builder.and_(code, low), builder.lshr(code, ir.Constant(_B16, [4] * 16)))]
        block(b, halves, scale)


def _f16_at(context, builder, base, b, half):
    """Pointer to the <16 x float> at base[32·b + 16·half]."""
    intp = context.get_value_type(types.intp)
    at = builder.add(builder.mul(b, ir.Constant(intp, 32)), ir.Constant(intp, 16 * half))
    return builder.bitcast(builder.gep(base, [at]), _F16.as_pointer())


@intrinsic
def _q4_dot_pshufb(typingctx, raw, scales, codes, v, x):
    """4-bit row v · x with the 16 grid values as int8 `codes` (_q4_row_blocks): each block's grid values times x,
    times its scale, add into 32 float32 lanes, summed once at the end. Float32 arithmetic like _q4_dot's (the grid
    values are integers, exact in int8), in another order."""
    if not _q4_row_types(raw, scales, codes, v, x):
        return None

    def codegen(context, builder, signature, args):
        xs = _data(context, builder, signature.args[4], args[4])
        lanes = [cgutils.alloca_once_value(builder, ir.Constant(_F16, [0.0] * 16)) for _ in range(2)]

        def block(b, halves, scale):
            for half, grid in enumerate(halves):
                xv = builder.load(_f16_at(context, builder, xs, b, half), align=4)
                term = builder.fmul(builder.fmul(grid, xv, flags=["fast"]), scale, flags=["fast"])
                builder.store(builder.fadd(builder.load(lanes[half]), term, flags=["fast"]), lanes[half])

        _q4_row_blocks(context, builder, signature, args, block)
        total = builder.fadd(builder.load(lanes[0]), builder.load(lanes[1]), flags=["fast"])
        width = 16
        while width > 1:  # pairwise halving: 4 vector additions, not 15 scalar ones
            width //= 2
            halves = [builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                                       list(range(k * width, (k + 1) * width))))
                      for k in range(2)]
            total = builder.fadd(*halves, flags=["fast"])
        return builder.extract_element(total, ir.Constant(ir.IntType(32), 0))

    return types.float32(raw, scales, codes, v, x), codegen


@intrinsic
def _q4_row_pshufb(typingctx, raw, scales, codes, v, out):
    """Row v of a 4-bit table widened to float32 into out (d,) (_q4_row_blocks: grid values times the block's scale,
    as _q4_row)."""
    if not _q4_row_types(raw, scales, codes, v, out):
        return None

    def codegen(context, builder, signature, args):
        dst = _data(context, builder, signature.args[4], args[4])

        def block(b, halves, scale):
            for half, grid in enumerate(halves):
                builder.store(builder.fmul(grid, scale), _f16_at(context, builder, dst, b, half), align=4)

        _q4_row_blocks(context, builder, signature, args, block)
        return context.get_dummy_value()

    return types.void(raw, scales, codes, v, out), codegen


@njit(**_OPTS)
def embed_q4(raw, scales, grid, ids, out):
    """out (T, d) = rows ids of a 4-bit table."""
    for t in range(ids.shape[0]):
        _q4_row(raw, scales, grid, ids[t], out[t])


@njit(**_OPTS)
def embed_factored(u_bytes, v_rows, s_mid, s_out, ids, out, accumulate):
    """out (T, d) (+)= rows ids of one binary-factored path: s_out[t]·Σ_k ±s_mid[k]·v_rows[k], where v_rows (r, d) is
    V·diag(s_in) widened to float32 once at load and the sign of k is bit k of U's row (bit 1 = −1)."""
    r, d = v_rows.shape
    for t in range(ids.shape[0]):
        row = ids[t]
        acc = np.zeros(d, dtype=np.float32)
        for k in range(r):
            c = -s_mid[k] if (u_bytes[row, k >> 3] >> (k & 7)) & 1 else s_mid[k]
            for j in range(d):
                acc[j] += c * v_rows[k, j]
        scale = s_out[row]
        for j in range(d):
            out[t, j] = out[t, j] + scale * acc[j] if accumulate else scale * acc[j]


@njit(inline="always", **_OPTS)
def _q4_row_bytes(raw, scales, grid, codes, v, out):
    _q4_row_pshufb(raw, scales, codes, v, out)


@njit(inline="always", **_OPTS)
def _q4_row_floats(raw, scales, grid, codes, v, out):
    _q4_row(raw, scales, grid, v, out)


@njit(inline="always", **_OPTS)
def _q4_dot_bytes(raw, scales, grid, codes, v, x, lane):
    return _q4_dot_pshufb(raw, scales, codes, v, x)


@njit(inline="always", **_OPTS)
def _q4_dot_floats(raw, scales, grid, codes, v, x, lane):
    return _q4_dot(raw, scales, grid, v, x, lane)


def _kernels(parallel: bool, pshufb: bool) -> SimpleNamespace:
    loop = prange if parallel else range
    dot, widen = (_q4_dot_bytes, _q4_row_bytes) if pshufb else (_q4_dot_floats, _q4_row_floats)

    @njit(parallel=parallel, **_OPTS)
    def head_q4(raw, scales, grid, codes, x, out):
        """out (T, V) = x (T, d) · tableᵀ over 4-bit rows; tasks are blocks of ROW_BLOCK rows. One token: a row's
        dot product (_q4_dot_pshufb where the CPU has SSSE3, else _q4_dot); several: each row widened once into a
        buffer (by pshufb, or through the float grid), then one vectorized reduction per token."""
        t_all, d = x.shape
        vocab = raw.shape[0]
        for blk in loop((vocab + ROW_BLOCK - 1) // ROW_BLOCK):
            lane = np.empty(32, dtype=np.float32)
            row = np.empty(d, dtype=np.float32)
            for v in range(blk * ROW_BLOCK, min((blk + 1) * ROW_BLOCK, vocab)):
                if t_all == 1:
                    out[0, v] = dot(raw, scales, grid, codes, v, x[0], lane)
                    continue
                widen(raw, scales, grid, codes, v, row)
                for t in range(t_all):
                    acc = np.float32(0.0)
                    for k in range(d):
                        acc += row[k] * x[t, k]
                    out[t, v] = acc

    return SimpleNamespace(head_q4=head_q4)


PSHUFB = ssse3()
SERIAL = _kernels(False, PSHUFB)
PARALLEL = _kernels(True, PSHUFB)


@dataclass(frozen=True)
class FactoredTable:
    """A binary-factored embedding / head as the numba backend runs it: `linear` (the backend's prepared factored
    linear, V out × d in) is the head; each path's U sign bytes, V·diag(s_in) widened to float32 (r×d, 4·r·d bytes,
    once at load), s_mid and s_out give the embedding's rows."""

    linear: object
    paths: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]  # (u_bytes, v_rows, s_mid, s_out)
    hidden: int


def factored_table(linear: object, table: FactoredLinear) -> FactoredTable:
    """`table` (nqfmt's FactoredLinear of the file) prepared for embed_factored; `linear` is its prepared head."""
    paths = []
    for p in table.paths:
        v_rows = unpack_signs(p.v_signs, table.n, np.float32) * p.scale_in.astype(np.float32)
        mid = np.ones(p.rank, np.float32) if p.scale_mid is None else p.scale_mid.astype(np.float32)
        paths.append((p.u_signs.view(np.uint8), np.ascontiguousarray(v_rows), mid, p.scale_out.astype(np.float32)))
    return FactoredTable(linear, tuple(paths), table.n)
