"""Binary linears on CPUs with AVX2 but no AVX-512: inputs in 11-bit fixed point, 16-entry int16 tables, `vpshufb`.

For every 4 inputs a 16-entry table holds all their signed sums, T_k[b] = Σ_j (bit j of b ? −1 : +1)·q[4k+j], as on
LUT-16; here the inputs q are integers, so a table fits `vpshufb`, which looks 32 bytes up in a 16-byte table at once.
Each stage's input is rounded per block of 32 to q = rint(x · 1023 / absmax) (a float32 scale absmax / 1023 per
block), so an entry is at most 4·1023 in magnitude and a block's 8 tables add up to at most 32736: int16 throughout,
exact. A table is stored as its 16 low bytes and its 16 high bytes; one `vpshufb` each looks up the same 4 columns of
32 rows, and interleaving the two results (`vpunpcklbw` / `vpunpckhbw`) gives the rows' int16 entries. Per block the
two int16 sums of the 32 rows are widened to float32, times the block's scale, and added to the rows' float sums.

The rounding is the only difference from the exact float32 product: an input's error is at most absmax/2046 of its
block, 1/8 of the int8 rounding (absmax/254) whose effect on perplexity runtime/README.md reports. `exact=True` keeps
the LUT-8 kernels of numba_kernels.py.

Layout: each sign matrix (rows × bytes, byte g of a row = columns 8g..8g+7, bit 1 = −1) is repacked at load into tiles
of 32 rows, tiles[t, g, POSITION[l]] = bytes[32t + l, g]: one 32-byte load holds byte g of 32 rows; its low nibbles
(columns 8g..8g+3) and high nibbles (8g+4..8g+7) are the indices of two lookups. POSITION undoes the unpacks' order, so
that the first int16 sum holds rows 0-15 and the second rows 16-31. Rows past the end are zero bytes, and inputs past
n are zero, so padding adds nothing.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .numba_lut16 import _data, address

_OPTS = dict(fastmath=True, cache=True, nogil=True)
ROWS = 32  # rows per tile: the bytes of one 256-bit register
BLOCK = 32  # inputs per scale: 4 sign bytes of a row, 8 tables
QMAX = 1023  # |q| ≤ 1023: a block's sum of 8 table entries ≤ 8·4·1023 = 32736 fits int16
TABLE_BYTES = 32  # a table: 16 low bytes, then 16 high bytes of its int16 entries
BLOCK_FLOATS = 8 * TABLE_BYTES // 4  # a block's 8 tables, in the float32 scratch that holds them
TABLE_WORD = BLOCK_FLOATS + 1  # scratch floats per 32 inputs: their tables, and their scale after every block's tables
_VB = ir.VectorType(ir.IntType(8), ROWS)
_VB16 = ir.VectorType(ir.IntType(8), 16)
_VW = ir.VectorType(ir.IntType(16), 16)
_VF = ir.VectorType(ir.FloatType(), 16)
_F32 = types.Array(types.float32, 1, "C")
_I32 = ir.IntType(32)


def _splat(builder, value, vtype):
    """`value` in every lane of a vector of type vtype."""
    undef = ir.Constant(vtype, ir.Undefined)
    one = builder.insert_element(undef, value, _I32(0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, vtype.count), [0] * vtype.count))


def _unpack_order(high: bool) -> list[int]:
    """vpunpck{l,h}bw of (lo, hi) as one shufflevector over their 64 bytes: per 128-bit lane, bytes 0-7 (or 8-15) of
    lo interleaved with the same bytes of hi."""
    start = 8 if high else 0
    return [i + src for lane in (0, 16) for i in range(lane + start, lane + start + 8) for src in (0, ROWS)]


# POSITION[l]: the byte of a tile's 32 that holds row l. The low unpack's word j comes from byte 16·(j // 8) + j % 8,
# the high unpack's from the same + 8; the low unpack's words are rows 0-15, the high one's rows 16-31.
POSITION = np.array([16 * ((l % 16) // 8) + (l % 8) + 8 * (l // 16) for l in range(ROWS)], np.int64)


def repack(signs: np.ndarray) -> np.ndarray:
    """Sign matrix (rows, bytes) uint8 → tiles (⌈rows/32⌉, bytes, 32) uint8, tiles[t, g, POSITION[l]] =
    signs[32t + l, g]; rows past the end are zero."""
    rows, nb = signs.shape
    n_tiles = (rows + ROWS - 1) // ROWS
    padded = np.zeros((n_tiles * ROWS, nb), np.uint8)
    padded[:rows] = signs
    tiles = np.empty((n_tiles, nb, ROWS), np.uint8)
    tiles[:, :, POSITION] = padded.reshape(n_tiles, ROWS, nb).transpose(0, 2, 1)
    return tiles


@intrinsic
def block_tables(typingctx, v, vi, inv, tab, ti):
    """The 8 tables of the block of 32 inputs at v[vi] rounded to q = rint(v·inv), as bytes over the float32
    tab[ti : ti + BLOCK_FLOATS]: per 4 inputs, Σ_j ±q_j as 16 int16 entries by one `vpsignw` per input, then their
    low and high bytes."""
    if not (v == tab == _F32 and isinstance(inv, types.Float) and isinstance(vi, types.Integer)
            and isinstance(ti, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        intp = context.get_value_type(types.intp)
        vb = ir.VectorType(ir.FloatType(), BLOCK)
        psign = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VW, [_VW, _VW]),
                                               "llvm.x86.avx2.psign.w")
        rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vb, [vb]), "llvm.rint.v32f32")
        at = builder.gep(_data(context, builder, ty[0], args[0]), [context.cast(builder, args[1], ty[1], types.intp)])
        x = builder.load(builder.bitcast(at, vb.as_pointer()), align=4)
        scale = context.cast(builder, args[2], ty[2], types.float32)
        q = builder.fptosi(builder.call(rint, [builder.fmul(x, _splat(builder, scale, vb))]),
                           ir.VectorType(ir.IntType(16), BLOCK))
        out = builder.bitcast(builder.gep(_data(context, builder, ty[3], args[3]),
                                          [context.cast(builder, args[4], ty[4], types.intp)]), ir.IntType(8).as_pointer())
        signs = [ir.Constant(_VW, [-1 if (e >> j) & 1 else 1 for e in range(16)]) for j in range(4)]
        bytes_of = [ir.Constant(ir.VectorType(_I32, 16), list(range(part, 32, 2))) for part in (0, 1)]
        for k in range(BLOCK // 4):
            entries = None
            for j in range(4):
                qj = builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(_I32, 16), [4 * k + j] * 16))
                term = builder.call(psign, [qj, signs[j]])
                entries = term if entries is None else builder.add(entries, term)
            as_bytes = builder.bitcast(entries, _VB)
            for part in (0, 1):  # little-endian: even bytes are the low ones
                dest = builder.gep(out, [ir.Constant(intp, TABLE_BYTES * k + 16 * part)])
                builder.store(builder.shuffle_vector(as_bytes, as_bytes, bytes_of[part]),
                              builder.bitcast(dest, _VB16.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(v, vi, inv, tab, ti), codegen


@njit(inline="always", **_OPTS)
def build_tables(tab, to, x, xi, groups):
    """The tables of the 4·groups inputs x[xi:] (groups a multiple of 8, zero past the input) into tab[to:]: block
    b's 8 tables as bytes over tab[to + 64b : to + 64b + 64], its scale absmax_b / QMAX at tab[to + 64·blocks + b]
    (TABLE_WORD floats per 32 inputs in all). The arguments are LUT-16's build_tables', so the fused decode step
    (numba_decode.py) runs either."""
    blocks = groups // 8
    for b in range(blocks):
        amax = np.float32(0.0)
        xb = x[xi + b * BLOCK:xi + (b + 1) * BLOCK]
        for p in range(BLOCK):
            amax = max(amax, abs(xb[p]))
        inv = np.float32(QMAX) / amax if amax > 0 else np.float32(0.0)
        tab[to + BLOCK_FLOATS * blocks + b] = amax / np.float32(QMAX)
        block_tables(x, xi + b * BLOCK, inv, tab, to + BLOCK_FLOATS * b)


@intrinsic
def lookup_tile(typingctx, tab, to, tile_addr, blocks, sums, oi):
    """sums[oi : oi+32] = the 32 rows of the tile at `tile_addr` (4·blocks sign bytes × 32) times the input whose
    tables build_tables put at tab[to:] (LUT-16's lookup_tile's arguments)."""
    ints = (to, tile_addr, blocks, oi)
    if not (tab == sums == _F32 and all(isinstance(a, types.Integer) for a in ints)):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        intp = context.get_value_type(types.intp)
        const = lambda value: ir.Constant(intp, value)  # noqa: E731
        pshufb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VB, [_VB, _VB]),
                                                "llvm.x86.avx2.pshuf.b")
        blocks = context.cast(builder, args[3], ty[3], types.intp)
        tab_f = builder.gep(_data(context, builder, ty[0], args[0]), [context.cast(builder, args[1], ty[1], types.intp)])
        tab_p = builder.bitcast(tab_f, ir.IntType(8).as_pointer())
        xs_p = builder.gep(tab_f, [builder.mul(blocks, const(BLOCK_FLOATS))])
        tiles = builder.inttoptr(context.cast(builder, args[2], ty[2], types.int64), _VB.as_pointer())
        out = builder.gep(_data(context, builder, ty[4], args[4]), [context.cast(builder, args[5], ty[5], types.intp)])
        low = ir.Constant(_VB, [0x0F] * ROWS)
        four = ir.Constant(_VB, [4] * ROWS)
        both_lanes = ir.Constant(ir.VectorType(_I32, ROWS), list(range(16)) * 2)
        unpack = [ir.Constant(ir.VectorType(_I32, ROWS), _unpack_order(high)) for high in (False, True)]
        zero_w = ir.Constant(_VW, [0] * 16)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_VF, [0.0] * 16)) for _ in range(2)]

        def table(k, half):  # 16 bytes of table k, in both 128-bit lanes
            at = builder.gep(tab_p, [builder.add(builder.mul(k, const(TABLE_BYTES)), const(16 * half))])
            t16 = builder.load(builder.bitcast(at, _VB16.as_pointer()), align=1)
            return builder.shuffle_vector(t16, t16, both_lanes)

        with cgutils.for_range(builder, blocks) as loop:
            b = loop.index
            sums = [zero_w, zero_w]
            for g in range(4):
                byte = builder.add(builder.mul(b, const(4)), const(g))
                signs = builder.load(builder.gep(tiles, [byte]), align=1)
                nibbles = (builder.and_(signs, low), builder.and_(builder.lshr(signs, four), low))
                for h, index in enumerate(nibbles):
                    k = builder.add(builder.mul(byte, const(2)), const(h))
                    lo, hi = (builder.call(pshufb, [table(k, half), index]) for half in (0, 1))
                    for s in range(2):
                        words = builder.bitcast(builder.shuffle_vector(lo, hi, unpack[s]), _VW)
                        sums[s] = builder.add(sums[s], words)
            splat = _splat(builder, builder.load(builder.gep(xs_p, [b])), _VF)
            for s in range(2):
                term = builder.fmul(builder.sitofp(sums[s], _VF), splat)
                builder.store(builder.fadd(builder.load(accs[s]), term), accs[s])
        for s in range(2):
            at = builder.bitcast(builder.gep(out, [const(16 * s)]), _VF.as_pointer())
            builder.store(builder.load(accs[s]), at, align=4)
        return context.get_dummy_value()

    return types.void(tab, to, tile_addr, blocks, sums, oi), codegen


@njit(**_OPTS)
def scratch_sizes(n, r, m):
    """Float32 sizes of one token's scratch (v: a stage's input, tab: its tables, sums: a stage's rows) for a path
    n → r → m."""
    width = max((n + BLOCK - 1) // BLOCK, (r + BLOCK - 1) // BLOCK) * BLOCK
    rows = max((r + ROWS - 1) // ROWS, (m + ROWS - 1) // ROWS) * ROWS
    return max(width, rows), width // BLOCK * TABLE_WORD, rows


@njit(inline="always", **_OPTS)
def _stage_tables(src, scale, count, words, v, tab):
    """A stage's input v = src ⊙ scale (count values, zero up to 32·words) and its tables into tab."""
    for j in range(count):
        v[j] = src[j] * scale[j]
    for j in range(count, words * BLOCK):
        v[j] = 0.0
    build_tables(tab, 0, v, 0, 8 * words)


def _path_kernel(parallel: bool):
    """y (+)= s_out ⊙ U·(s_mid ⊙ V·(s_in ⊙ x)) for one token, the tiles of each stage over `loop`."""
    loop = prange if parallel else range

    @njit(parallel=parallel, **_OPTS)
    def path_token(x, s_in, v_tiles, s_mid, u_tiles, s_out, v, tab, sums, y, accumulate):
        """One token; v, tab, sums are scratch of scratch_sizes."""
        words1, words2 = v_tiles.shape[1] // 4, u_tiles.shape[1] // 4
        _stage_tables(x, s_in, x.shape[0], words1, v, tab)
        at, stride = address(v_tiles), v_tiles.shape[1] * ROWS
        for t in loop(v_tiles.shape[0]):
            lookup_tile(tab, 0, at + t * stride, words1, sums, t * ROWS)
        _stage_tables(sums, s_mid, s_mid.shape[0], words2, v, tab)
        at, stride = address(u_tiles), u_tiles.shape[1] * ROWS
        for t in loop(u_tiles.shape[0]):
            lookup_tile(tab, 0, at + t * stride, words2, sums, t * ROWS)
        for i in range(s_out.shape[0]):
            if accumulate:
                y[i] += sums[i] * s_out[i]
            else:
                y[i] = sums[i] * s_out[i]

    return path_token


path_token_serial = _path_kernel(False)
path_token_parallel = _path_kernel(True)


def _tokens_kernel(parallel: bool):
    loop = prange if parallel else range

    @njit(parallel=parallel, **_OPTS)
    def path_tokens(x, s_in, v_tiles, s_mid, u_tiles, s_out, y, accumulate):
        """path_token for every row of x (T, n) into y (T, m), tokens over `loop`; each token's result is the one it
        gets alone."""
        sizes = scratch_sizes(x.shape[1], s_mid.shape[0], s_out.shape[0])
        for t in loop(x.shape[0]):
            v, tab, sums = np.empty(sizes[0], np.float32), np.empty(sizes[1], np.float32), np.empty(sizes[2], np.float32)
            path_token_serial(x[t], s_in, v_tiles, s_mid, u_tiles, s_out, v, tab, sums, y[t], accumulate)

    return path_tokens


path_tokens_serial = _tokens_kernel(False)
path_tokens_parallel = _tokens_kernel(True)
