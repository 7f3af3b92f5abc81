"""Binary linears with 4-input lookup tables held in vector registers (LUT-16), for CPUs with AVX-512.

For every 4 inputs x[4g .. 4g+3] a 16-entry table holds all their signed sums, T_g[b] = Σ_j (bit j of b ? −1 : +1)·
x[4g+j]: 16 float32, one 512-bit register. A nibble of a sign row indexes that table. With the nibbles of 16 rows for
the same 4 columns in the 16 int32 lanes of a register, one `vpermps` (llvm.x86.avx512.permvar.sf.512, which reads only
the low 4 bits of each index lane) looks all 16 up at once: 64 sign multiply-adds in one instruction, in exact float32
arithmetic (only the order of the additions differs from a dot product).

Layout: at load each sign matrix (rows × words of 32 columns, bit 1 = −1) is repacked into tiles of 16 rows,
tiles[b, w, l] = words[16b + l, w], rows past the end being zero words. One 512-bit load then holds word w of 16 rows;
shifting it right by 4k brings nibble k (columns 32w + 4k .. 32w + 4k + 3) into the low bits of every lane, so each
load serves 8 lookups, whose results are added as a tree. Inputs past n are zero in the tables, so padding columns add
nothing whatever their sign bits.

A product y = s_out ⊙ U·(s_mid ⊙ V·(s_in ⊙ x)) is two such stages. The kernels here take the tiles' address (an int64,
so one compiled kernel serves every linear and the fused decoder can index linears by table) and scratch buffers.
The portable fallback (CPUs without AVX-512) is the LUT-8 kernels of numba_kernels.py; the backend picks at load.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from nqfmt.q4 import BLOCK_BYTES

_OPTS = dict(fastmath=True, cache=True, nogil=True)
TILE = 16  # rows per tile: the lanes of one 512-bit register of int32 indices
TABLE_WORD = 8 * TILE  # table floats per 32 inputs: 8 tables of 16 entries
_F32 = types.Array(types.float32, 1, "C")
_VF = ir.VectorType(ir.FloatType(), TILE)
_VI = ir.VectorType(ir.IntType(32), TILE)


def repack(words: np.ndarray) -> np.ndarray:
    """Sign words (rows, words) uint32 → tiles (⌈rows/16⌉, words, 16): tiles[b, w, l] = words[16b + l, w]."""
    rows, nw = words.shape
    blocks = (rows + TILE - 1) // TILE
    tiles = np.zeros((blocks, nw, TILE), np.uint32)
    by_row = tiles.transpose(0, 2, 1)  # (blocks, 16, words), a view
    full = rows // TILE
    by_row[:full] = words[:full * TILE].reshape(full, TILE, nw)
    if full < blocks:
        by_row[full, :rows - full * TILE] = words[full * TILE:]
    return tiles


def _data(context, builder, arrty, arr):
    return context.make_array(arrty)(context, builder, arr).data


def _vector_at(builder, base, index, vtype):
    return builder.bitcast(builder.gep(base, [index]), vtype.as_pointer())


@intrinsic
def address(typingctx, arr):
    """The address of an array's first element, as int64."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, args):
        return builder.ptrtoint(_data(context, builder, signature.args[0], args[0]), ir.IntType(64))

    return types.int64(arr), codegen


@intrinsic
def build_tables(typingctx, tab, ti, x, xi, groups):
    """tab[ti + 16g + b] = Σ_j (bit j of b ? −1 : +1)·x[xi + 4g + j] for g < groups, four vector operations per
    table."""
    if not (tab == x == _F32 and all(isinstance(a, types.Integer) for a in (ti, xi, groups))):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        intp = context.get_value_type(types.intp)
        tab_p, x_p = _data(context, builder, ty[0], args[0]), _data(context, builder, ty[2], args[2])
        t0, x0, n = (context.cast(builder, args[k], ty[k], types.intp) for k in (1, 3, 4))
        signs = [ir.Constant(_VF, [-1.0 if (b >> j) & 1 else 1.0 for b in range(TILE)]) for j in range(4)]
        undef = ir.Constant(_VF, ir.Undefined)
        zeros = ir.Constant(_VI, [0] * TILE)
        with cgutils.for_range(builder, n) as loop:
            g = loop.index
            total = None
            for j in range(4):
                at = builder.add(x0, builder.add(builder.mul(g, ir.Constant(intp, 4)), ir.Constant(intp, j)))
                splat = builder.shuffle_vector(builder.insert_element(undef, builder.load(builder.gep(x_p, [at])),
                                                                      ir.Constant(ir.IntType(32), 0)),
                                               undef, zeros)
                term = builder.fmul(splat, signs[j])
                total = term if total is None else builder.fadd(total, term)
            at = builder.add(t0, builder.mul(g, ir.Constant(intp, TILE)))
            builder.store(total, _vector_at(builder, tab_p, at, _VF), align=4)
        return context.get_dummy_value()

    return types.void(tab, ti, x, xi, groups), codegen


@intrinsic
def lookup_tile(typingctx, tab, ti, tile_addr, words, sums, si):
    """sums[si : si+16] = for the 16 rows of the tile at `tile_addr` (words × 16 uint32), Σ_{w, k}
    tab[ti + (8w + k)·16 + nibble k of the row's word w]: per word one load of 16 rows' signs and 8 vpermps lookups
    added as a tree."""
    if not (tab == sums == _F32 and all(isinstance(a, types.Integer) for a in (ti, tile_addr, words, si))):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        intp = context.get_value_type(types.intp)
        tab_p, sums_p = _data(context, builder, ty[0], args[0]), _data(context, builder, ty[4], args[4])
        base = builder.inttoptr(context.cast(builder, args[2], ty[2], types.int64), _VI.as_pointer())
        t0, nw, first = (context.cast(builder, args[k], ty[k], types.intp) for k in (1, 3, 5))
        permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF, _VI]),
                                                 "llvm.x86.avx512.permvar.sf.512")
        acc = cgutils.alloca_once_value(builder, ir.Constant(_VF, [0.0] * TILE))
        with cgutils.for_range(builder, nw) as loop:
            w = loop.index
            signs = builder.load(builder.gep(base, [w]), align=4)
            parts = []
            for k in range(8):
                index = builder.lshr(signs, ir.Constant(_VI, [4 * k] * TILE)) if k else signs
                at = builder.add(t0, builder.mul(builder.add(builder.mul(w, ir.Constant(intp, 8)),
                                                             ir.Constant(intp, k)), ir.Constant(intp, TILE)))
                parts.append(builder.call(permute, [builder.load(_vector_at(builder, tab_p, at, _VF), align=4),
                                                    index]))
            while len(parts) > 1:
                parts = [builder.fadd(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
            builder.store(builder.fadd(builder.load(acc), parts[0]), acc)
        builder.store(builder.load(acc), _vector_at(builder, sums_p, first, _VF), align=4)
        return context.get_dummy_value()

    return types.void(tab, ti, tile_addr, words, sums, si), codegen


@njit(inline="always", **_OPTS)
def stage(xs, words, tiles_addr, b0, b1, tab, sums):
    """sums[16b + l] = Σ_k sign(16b + l, k)·xs[k] for tiles b0 ≤ b < b1 of a sign matrix with `words` words per row;
    xs holds 32·words inputs (zero past the matrix's columns)."""
    build_tables(tab, 0, xs, 0, 8 * words)
    for b in range(b0, b1):
        lookup_tile(tab, 0, tiles_addr + b * words * TILE * 4, words, sums, b * TILE)


@njit(inline="always", **_OPTS)
def _path(x, s_in, v_tiles, s_mid, u_tiles, s_out, xs, tab, h, sums, y, accumulate):
    """y (+)= s_out ⊙ U·(s_mid ⊙ V·(s_in ⊙ x)) for one token."""
    n, r, m = x.shape[0], s_mid.shape[0], s_out.shape[0]
    wn, wr = v_tiles.shape[1], u_tiles.shape[1]
    for j in range(n):
        xs[j] = x[j] * s_in[j]
    for j in range(n, 32 * wn):
        xs[j] = 0.0
    stage(xs, wn, address(v_tiles), 0, v_tiles.shape[0], tab, sums)
    for i in range(r):
        h[i] = sums[i] * s_mid[i]
    for i in range(r, 32 * wr):
        h[i] = 0.0
    stage(h, wr, address(u_tiles), 0, u_tiles.shape[0], tab, sums)
    for i in range(m):
        y[i] = y[i] + sums[i] * s_out[i] if accumulate else sums[i] * s_out[i]


def scratch_sizes(wn: int, wr: int, blocks_r: int, blocks_m: int) -> tuple[int, int, int, int]:
    """Floats of the scratch buffers (xs, tab, h, sums) a path with these tile shapes needs."""
    return 32 * wn, TABLE_WORD * max(wn, wr), 32 * wr, TILE * max(blocks_r, blocks_m)


def _kernels(parallel: bool):
    loop = prange if parallel else range

    @njit(parallel=parallel, **_OPTS)
    def binary_path(x, s_in, v_tiles, s_mid, u_tiles, s_out, y, accumulate):
        """y[t] (+)= s_out ⊙ U·(s_mid ⊙ V·(s_in ⊙ x[t])) for every token t (rows of x), tokens spread over the
        threads in the parallel build; each task has its own scratch."""
        t_all = x.shape[0]
        wn, wr = v_tiles.shape[1], u_tiles.shape[1]
        blocks = max(v_tiles.shape[0], u_tiles.shape[0])
        for t in loop(t_all):
            xs = np.empty(32 * wn, np.float32)
            tab = np.empty(TABLE_WORD * max(wn, wr), np.float32)
            h = np.empty(32 * wr, np.float32)
            sums = np.empty(TILE * blocks, np.float32)
            _path(x[t], s_in, v_tiles, s_mid, u_tiles, s_out, xs, tab, h, sums, y[t], accumulate)

    return binary_path


@njit(**_OPTS)
def binary_path_token(x, s_in, v_tiles, s_mid, u_tiles, s_out, xs, tab, h, sums, y, accumulate):
    """One token's product with caller-owned scratch (sizes from scratch_sizes): no allocation per call."""
    _path(x, s_in, v_tiles, s_mid, u_tiles, s_out, xs, tab, h, sums, y, accumulate)


binary_path_serial = _kernels(False)
binary_path_parallel = _kernels(True)


# --- 4-bit table heads (Q4_0, IQ4_NL) -------------------------------------------------------------------------------
# The same lookup serves a 4-bit head: for input position p a 16-entry table holds grid[j]·x[p] for every code j, and
# a row's code at p indexes it. One 512-bit load holds 8 codes of 16 rows; 4 loads cover a block of 32 positions,
# whose 32 lookups are added as a tree and multiplied by the 16 rows' block scales. Exact float32 arithmetic (the
# additions in another order than a dot product's).
def repack_q4(raw: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-bit block bytes (rows, d/32·18) and their block scales as float32 (rows, d/32) → code tiles (⌈rows/16⌉, d/8,
    16) uint32, word w of a row holding the codes of positions 8w .. 8w+7 (nibble j = position 8w + j), and scale
    tiles (⌈rows/16⌉, d/32, 16) float32; rows past the end have code 0 and scale 0. One pass over the bytes, no
    table-sized temporary."""
    rows, blocks = raw.shape[0], raw.shape[1] // BLOCK_BYTES
    n_tiles = (rows + TILE - 1) // TILE
    tiles = np.zeros((n_tiles, 4 * blocks, TILE), np.uint32)
    scale_tiles = np.zeros((n_tiles, blocks, TILE), np.float32)
    _q4_tiles(np.ascontiguousarray(raw), np.ascontiguousarray(scales, np.float32), tiles, scale_tiles)
    return tiles, scale_tiles


@njit(cache=True, nogil=True)
def _q4_tiles(raw, scales, tiles, scale_tiles):
    """The tiles of repack_q4. A block's 16 code bytes hold positions 0..15 in their low nibbles and 16..31 in their
    high ones, so word 4b + 2·half + g of row i gathers nibble `half` of bytes 8g .. 8g+7 of block b."""
    for i in range(raw.shape[0]):
        tile, lane = i // TILE, i % TILE
        for b in range(raw.shape[1] // BLOCK_BYTES):
            scale_tiles[tile, b, lane] = scales[i, b]
            at = b * BLOCK_BYTES + 2
            for half in range(2):
                for g in range(2):
                    word = np.uint32(0)
                    for k in range(8):
                        code = np.uint32((raw[i, at + 8 * g + k] >> (4 * half)) & 15)
                        word |= code << np.uint32(4 * k)
                    tiles[tile, 4 * b + 2 * half + g, lane] = word


@intrinsic
def lookup_q4_tile(typingctx, tab, ti, tile_addr, scales_addr, blocks, sums, si):
    """sums[si : si+16] = for the 16 rows of the code tile at `tile_addr` (4·blocks words × 16 uint32) with block scales
    at `scales_addr` (blocks × 16 float32), Σ_b scale[b]·Σ_{p in block b} tab[ti + 16p + code at p]."""
    if not (tab == sums == _F32 and all(isinstance(a, types.Integer) for a in (ti, tile_addr, scales_addr, blocks,
                                                                                si))):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        intp = context.get_value_type(types.intp)
        tab_p, sums_p = _data(context, builder, ty[0], args[0]), _data(context, builder, ty[5], args[5])
        codes = builder.inttoptr(context.cast(builder, args[2], ty[2], types.int64), _VI.as_pointer())
        scales = builder.inttoptr(context.cast(builder, args[3], ty[3], types.int64), _VF.as_pointer())
        t0, nb, first = (context.cast(builder, args[k], ty[k], types.intp) for k in (1, 4, 6))
        permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF, _VI]),
                                                 "llvm.x86.avx512.permvar.sf.512")
        acc = cgutils.alloca_once_value(builder, ir.Constant(_VF, [0.0] * TILE))
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            parts = []
            for wi in range(4):
                w = builder.add(builder.mul(b, ir.Constant(intp, 4)), ir.Constant(intp, wi))
                word = builder.load(builder.gep(codes, [w]), align=4)
                for k in range(8):
                    index = builder.lshr(word, ir.Constant(_VI, [4 * k] * TILE)) if k else word
                    position = builder.add(builder.mul(w, ir.Constant(intp, 8)), ir.Constant(intp, k))
                    at = builder.add(t0, builder.mul(position, ir.Constant(intp, TILE)))
                    parts.append(builder.call(permute, [builder.load(_vector_at(builder, tab_p, at, _VF), align=4),
                                                        index]))
            while len(parts) > 1:
                parts = [builder.fadd(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
            scale = builder.load(builder.gep(scales, [b]), align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(parts[0], scale)), acc)
        builder.store(builder.load(acc), _vector_at(builder, sums_p, first, _VF), align=4)
        return context.get_dummy_value()

    return types.void(tab, ti, tile_addr, scales_addr, blocks, sums, si), codegen


HEAD_TILES_PER_TASK = 64  # 1024 vocabulary rows per task of the parallel head


def _head_kernels(parallel: bool):
    loop = prange if parallel else range

    @njit(parallel=parallel, **_OPTS)
    def head_q4(tiles, scales, grid, x, out):
        """out (T, V) = x (T, d) · tableᵀ for a 4-bit table repacked by repack_q4; tasks are runs of
        HEAD_TILES_PER_TASK tiles, each doing every token (a tile's codes are read once for all of them)."""
        t_all, d = x.shape
        vocab = out.shape[1]
        n_tiles, words, blocks = tiles.shape[0], tiles.shape[1], scales.shape[1]
        tab = np.empty(t_all * TILE * d, np.float32)
        for t in range(t_all):
            for p in range(d):
                for j in range(TILE):
                    tab[(t * d + p) * TILE + j] = grid[j] * x[t, p]
        tiles_at, scales_at = address(tiles), address(scales)
        for task in loop((n_tiles + HEAD_TILES_PER_TASK - 1) // HEAD_TILES_PER_TASK):
            sums = np.empty(TILE, np.float32)
            for b in range(task * HEAD_TILES_PER_TASK, min((task + 1) * HEAD_TILES_PER_TASK, n_tiles)):
                rows = min(TILE, vocab - b * TILE)
                for t in range(t_all):
                    lookup_q4_tile(tab, t * d * TILE, tiles_at + b * words * TILE * 4,
                                   scales_at + b * blocks * TILE * 4, blocks, sums, 0)
                    for l in range(rows):
                        out[t, b * TILE + l] = sums[l]

    return head_q4


head_q4_serial = _head_kernels(False)
head_q4_parallel = _head_kernels(True)


def available() -> bool:
    """Whether this CPU runs the kernels (AVX-512 F), asked of LLVM's view of the host."""
    from llvmlite import binding
    return bool(binding.get_host_cpu_features().get("avx512f", False))
