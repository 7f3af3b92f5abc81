"""The 4-bit and Q8_0 heads by int8 dot products: AVX-512 VNNI where the CPU has it, else AVX2.

The head is the largest product of a token (V·d multiply-adds: 28 M on SmolLM2-135M, 233 M on Qwen2.5-1.5B). Here the
token's normalized hidden state is quantized per block of 32 to int8 (a float32 scale per block: absmax / 127, as
llama.cpp's Q8_0 activations), and a row's logit is Σ_b d_row,b · xs_b · Σ_{p in b} w_p·xq_p with the inner sum exact
in int32. The codes stay in the tiles numba_lut16.repack_q4 builds at load (16 rows, word w of a row = the nibbles of
positions 8w..8w+7): a word's low and high nibbles (positions 8w + 0,2,4,6 and 8w + 1,3,5,7) become bytes by one
`vpshufb` each through the type's 16 grid values + 128 (unsigned), and one `vpdpbusd` multiplies 4 bytes of each of
the 16 rows by 4 bytes of the token (broadcast) and adds them into the row's int32 lane. The +128 offset is removed
per block as 128·Σ_{p in b} xq_p. Q8_0 rows (a hot-row table's) are repacked the same way: word j of a row holds
4 of its int8 values + 128 in the order the token's bytes have (8w + 0,2,4,6, then 8w + 1,3,5,7).

Without VNNI (AVX2: most x86 CPUs without AVX-512) each 16-row word runs as two halves of 8 rows: with w the signed
values (the table bytes − 128), `vpmaddubsw` multiplies |w| (unsigned, psign(w, w): 128 where w = −128) by the token's
bytes carrying w's sign (psign(x, w)) and adds pairs into int16 (|w·x| ≤ 128·127, a pair ≤ 32512: no saturation),
and `vpmaddwd` by ones adds those pairs into the row's int32 lane: Σ w·x exactly, no offset to remove. The block
sums, hence the logits, are the same integers as VNNI's, and the float operations after them are the same.

The only difference from the exact float32 head is the rounding of the token to int8; runtime/README.md (the int8
head) gives its measured effect on perplexity.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nqfmt.q4 import GRIDS

from .numba_lut16 import TILE, _data, address, repack

_OPTS = dict(fastmath=True, cache=True, nogil=True)
BLOCK = 32  # positions per scale, of the table and of the quantized token
OFFSET = 128  # added to every table value so that vpdpbusd's unsigned operand holds it
Q8_BLOCK_BYTES = 34
TILES_PER_TASK = 64  # 1024 vocabulary rows per task of the parallel head
GROUP = 4  # tokens per q8_tile_group: 8 independent vpdpbusd chains
_VI = ir.VectorType(ir.IntType(32), TILE)
_VF = ir.VectorType(ir.FloatType(), TILE)
_VB = ir.VectorType(ir.IntType(8), 4 * TILE)
_I32 = types.Array(types.int32, 1, "C")
_F32 = types.Array(types.float32, 1, "C")
_U8 = types.Array(types.uint8, 1, "C")


def isa() -> str | None:
    """The instructions the kernels use: "vnni" (AVX-512 F, BW for vpshufb, VNNI for vpdpbusd), "avx2" (vpshufb,
    vpmaddubsw, vpmaddwd on 256 bits), or None, for the CPU numba compiles for (NUMBA_CPU_FEATURES when set, else the
    host as LLVM sees it). The kernels emit one or the other when numba compiles them."""
    from numba.core import config
    if config.CPU_FEATURES is not None:
        on = {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
    else:
        from llvmlite import binding
        on = {name for name, present in binding.get_host_cpu_features().items() if present}
    if {"avx512f", "avx512bw", "avx512vnni"} <= on:
        return "vnni"
    return "avx2" if "avx2" in on else None


NO_LUT = np.zeros(4 * TILE, np.uint8)  # the Q8_0 head's unused byte table


def byte_order() -> np.ndarray:
    """slot[p]: where position p of a block of 32 goes in the quantized token (and in a Q8_0 tile's words)."""
    p = np.arange(BLOCK)
    w, j = p // 8, p % 8
    return 8 * w + j // 2 + 4 * (j % 2)


def grid_lut(gtype) -> np.ndarray:
    """The type's 16 grid values + OFFSET as bytes, repeated in each 128-bit lane (vpshufb looks up per lane)."""
    return np.tile((GRIDS[gtype].astype(np.int16) + OFFSET).astype(np.uint8), 4)


def repack_q8(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 rows (rows, d/32·34 bytes) → value tiles (⌈rows/16⌉, d/4, 16) uint32, word j of a row holding its values
    + 128 at the positions byte_order puts in slots 4j..4j+3, and scale tiles (⌈rows/16⌉, d/32, 16) float32; rows past
    the end are zero."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, Q8_BLOCK_BYTES)
    nb = blocks.shape[1]
    scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[:, :, 0].astype(np.float32)
    values = np.empty((rows, nb, BLOCK), np.uint8)
    values[:, :, byte_order()] = blocks[:, :, 2:] ^ np.uint8(OFFSET)
    n_tiles = (rows + TILE - 1) // TILE
    scale_tiles = np.zeros((n_tiles * TILE, nb), np.float32)
    scale_tiles[:rows] = scales
    words = repack(np.ascontiguousarray(values).reshape(rows, -1).view(np.uint32))
    return words, np.ascontiguousarray(scale_tiles.reshape(n_tiles, TILE, nb).transpose(0, 2, 1))


@njit(**_OPTS)
def quantize_tokens(x, xq, xs, corr):
    """x (T, d) float32 → xq (T, d) int8 in byte_order within each block of 32, xs (T, d/32) float32 block scales
    (absmax / 127), corr (T, d/32) int32 = OFFSET·Σ xq of the block."""
    t_all, d = x.shape
    for t in range(t_all):
        for b in range(d // BLOCK):
            amax = np.float32(0.0)
            for p in range(BLOCK):
                amax = max(amax, abs(x[t, b * BLOCK + p]))
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            xs[t, b] = amax / np.float32(127.0)
            total = 0
            for p in range(BLOCK):
                q = np.int32(np.rint(x[t, b * BLOCK + p] * inv))
                xq[t, b * BLOCK + 8 * (p // 8) + (p % 8) // 2 + 4 * (p % 2)] = q
                total += q
            corr[t, b] = OFFSET * total


def _splat(builder, value, vtype=_VI):
    """`value` in every lane of a vector of type vtype."""
    undef = ir.Constant(vtype, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, ir.Constant(_VI, [0] * TILE))


def _vnni(builder):
    dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI, [_VI, _VI, _VI]),
                                         "llvm.x86.avx512.vpdpbusd.512")
    shuffle = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VB, [_VB, _VB]),
                                             "llvm.x86.avx512.pshuf.b.512")
    return dot, shuffle


_VB2 = ir.VectorType(ir.IntType(8), 32)  # one 256-bit half of a word of 16 rows: 8 rows × 4 bytes
_VW2 = ir.VectorType(ir.IntType(16), 16)
_VI2 = ir.VectorType(ir.IntType(32), 8)
_HALF = 8


class _Avx2:
    """The 512-bit operations of the kernels on two 256-bit halves (rows 0-7 and 8-15 of a tile)."""

    def __init__(self, builder) -> None:
        fn = lambda name, ret, *args: cgutils.get_or_insert_function(  # noqa: E731
            builder.module, ir.FunctionType(ret, list(args)), name)
        self.b = builder
        self.pshufb = fn("llvm.x86.avx2.pshuf.b", _VB2, _VB2, _VB2)
        self.psign = fn("llvm.x86.avx2.psign.b", _VB2, _VB2, _VB2)
        self.maddubs = fn("llvm.x86.avx2.pmadd.ub.sw", _VW2, _VB2, _VB2)
        self.maddwd = fn("llvm.x86.avx2.pmadd.wd", _VI2, _VW2, _VW2)
        self.ones = ir.Constant(_VW2, [1] * 16)
        self.flip = ir.Constant(_VI, [0x80808080] * TILE)

    def halves(self, v):
        """<16 x i32> → two <32 x i8>."""
        b = self.b
        return [b.bitcast(b.shuffle_vector(v, v, ir.Constant(_VI2, list(range(k, k + _HALF)))), _VB2)
                for k in (0, _HALF)]

    def join(self, lo, hi):
        """Two 256-bit halves → <16 x i32>."""
        b = self.b
        return b.shuffle_vector(b.bitcast(lo, _VI2), b.bitcast(hi, _VI2), ir.Constant(_VI, list(range(TILE))))

    def shuffle(self, table, index):
        """vpshufb of <64 x i8> `table` (16 bytes repeated) by the bytes of <16 x i32> `index`, as two halves."""
        b = self.b
        lut = b.shuffle_vector(table, table, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
        return self.join(*(b.call(self.pshufb, [lut, h]) for h in self.halves(index)))

    def signed(self, word):
        """A word of table bytes (values + 128) → its signed values w and |w|, as halves."""
        w = self.halves(self.b.xor(word, self.flip))
        return w, [self.b.call(self.psign, [h, h]) for h in w]

    def dot(self, chain, w, absw, x4):
        """chain (<16 x i32>) + per row Σ of its 4 bytes w times the token's 4 bytes x4 (splat <16 x i32>)."""
        b = self.b
        x = self.halves(x4)[0]
        prods = [b.call(self.maddwd, [b.call(self.maddubs, [absw[k], b.call(self.psign, [x, w[k]])]), self.ones])
                 for k in range(2)]
        return b.add(chain, self.join(*prods))


def _byte_shuffle(builder):
    """shuffle(table, index): vpshufb of the <64 x i8> table by the bytes of a <16 x i32> index, as one 512-bit
    instruction (VNNI's CPUs) or two 256-bit ones."""
    if isa() != "vnni":
        return _Avx2(builder).shuffle
    vnni_shuffle = _vnni(builder)[1]
    return lambda table, index: builder.bitcast(builder.call(vnni_shuffle, [table, builder.bitcast(index, _VB)]), _VI)


def _tile_codegen(nibbles: bool, tokens: int = 1):
    """The body shared by the 4-bit and the Q8_0 tile: per block, words of 16 rows → int32 block sums by vpdpbusd
    (two chains per token), offset removed, widened, times the rows' block scales and the token's, added to the row
    sums. With several `tokens` (consecutive in xq/xs/corr, their sums 16 apart) each word is loaded once for all of
    them and their chains are independent, so the vpdpbusd run back to back instead of waiting on each other; each
    token's float operations are the same, in the same order, as alone."""
    words_per_block = BLOCK // 8 if nibbles else BLOCK // 4

    def codegen(context, builder, signature, args):
        ty = signature.args
        intp = context.get_value_type(types.intp)
        vnni = isa() == "vnni"
        shuffle = _byte_shuffle(builder)
        if vnni:
            dot = _vnni(builder)[0]
        else:
            avx2 = _Avx2(builder)
        lut = builder.load(builder.bitcast(_data(context, builder, ty[0], args[0]), _VB.as_pointer()), align=1)
        codes = builder.inttoptr(context.cast(builder, args[1], ty[1], types.int64), _VI.as_pointer())
        scales = builder.inttoptr(context.cast(builder, args[2], ty[2], types.int64), _VF.as_pointer())
        nb = context.cast(builder, args[3], ty[3], types.intp)
        xq_p, xs_p, corr_p, sums_p = (_data(context, builder, ty[k], args[k]) for k in (4, 6, 8, 10))
        xi, si, ci, oi = (context.cast(builder, args[k], ty[k], types.intp) for k in (5, 7, 9, 11))
        token_words = builder.mul(nb, ir.Constant(intp, 8))  # d/4 int32 words of one quantized token
        xis = [builder.add(xi, builder.mul(token_words, ir.Constant(intp, t))) for t in range(tokens)]
        sis = [builder.add(si, builder.mul(nb, ir.Constant(intp, t))) for t in range(tokens)]
        cis = [builder.add(ci, builder.mul(nb, ir.Constant(intp, t))) for t in range(tokens)]
        low = ir.Constant(_VI, [0x0F0F0F0F] * TILE)
        zero = ir.Constant(_VI, [0] * TILE)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_VF, [0.0] * TILE)) for _ in range(tokens)]
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            chains, n = [[zero, zero] for _ in range(tokens)], 0
            for k in range(words_per_block):
                w = builder.add(builder.mul(b, ir.Constant(intp, words_per_block)), ir.Constant(intp, k))
                word = builder.load(builder.gep(codes, [w]), align=4)
                if nibbles:  # low nibbles: token bytes 2w; high: 2w + 1
                    parts = [builder.and_(word, low), builder.and_(builder.lshr(word, ir.Constant(_VI, [4] * TILE)),
                                                                   low)]
                    parts = [shuffle(lut, p) for p in parts]
                    slots = [builder.mul(w, ir.Constant(intp, 2)),
                             builder.add(builder.mul(w, ir.Constant(intp, 2)), ir.Constant(intp, 1))]
                else:
                    parts, slots = [word], [w]
                for part, slot in zip(parts, slots):
                    if not vnni:
                        w, absw = avx2.signed(part)
                    for t in range(tokens):
                        x4 = _splat(builder, builder.load(builder.gep(xq_p, [builder.add(xis[t], slot)])))
                        chains[t][n % 2] = (builder.call(dot, [chains[t][n % 2], part, x4]) if vnni
                                            else avx2.dot(chains[t][n % 2], w, absw, x4))
                    n += 1
            row_scales_b = builder.load(builder.gep(scales, [b]), align=4)
            for t in range(tokens):
                block_sum = builder.add(chains[t][0], chains[t][1])
                if vnni:  # vpdpbusd multiplied w + 128
                    block_sum = builder.sub(block_sum, _splat(builder, builder.load(builder.gep(corr_p, [
                        builder.add(cis[t], b)]))))
                token_scale = _splat(builder, builder.load(builder.gep(xs_p, [builder.add(sis[t], b)])), _VF)
                term = builder.fmul(builder.sitofp(block_sum, _VF), builder.fmul(row_scales_b, token_scale))
                builder.store(builder.fadd(builder.load(accs[t]), term), accs[t])
        for t in range(tokens):
            at = builder.add(oi, ir.Constant(intp, TILE * t))
            builder.store(builder.load(accs[t]), builder.bitcast(builder.gep(sums_p, [at]), _VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


def _tile_signature(lut, tile_addr, scales_addr, blocks, xq, xi, xs, si, corr, ci, sums, oi):
    ints = (tile_addr, scales_addr, blocks, xi, si, ci, oi)
    if not (lut == _U8 and xq == corr == _I32 and xs == sums == _F32 and all(isinstance(a, types.Integer) for a in ints)):
        return None
    return types.void(lut, tile_addr, scales_addr, blocks, xq, xi, xs, si, corr, ci, sums, oi)


@intrinsic
def q4_tile(typingctx, lut, tile_addr, scales_addr, blocks, xq, xi, xs, si, corr, ci, sums, oi):
    """sums[oi : oi+16] = the dot products of the 16 rows of the 4-bit code tile at `tile_addr` (4·blocks words × 16,
    with block scales at `scales_addr`: blocks × 16 float32) with the quantized token whose int32 words start at
    xq[xi] (block scales xs[si..], offsets corr[ci..]); `lut` is grid_lut of the table's type."""
    sig = _tile_signature(lut, tile_addr, scales_addr, blocks, xq, xi, xs, si, corr, ci, sums, oi)
    return (sig, _tile_codegen(True)) if sig else None


@intrinsic
def q8_tile(typingctx, lut, tile_addr, scales_addr, blocks, xq, xi, xs, si, corr, ci, sums, oi):
    """As q4_tile for a Q8_0 value tile (8·blocks words × 16, repack_q8); `lut` is unused."""
    sig = _tile_signature(lut, tile_addr, scales_addr, blocks, xq, xi, xs, si, corr, ci, sums, oi)
    return (sig, _tile_codegen(False)) if sig else None


@intrinsic
def q8_tile_group(typingctx, lut, tile_addr, scales_addr, blocks, xq, xi, xs, si, corr, ci, sums, oi):
    """q8_tile for GROUP consecutive tokens at once (token t's words at xi + t·8·blocks, scales and offsets at
    si, ci + t·blocks, sums at oi + 16·t): each word is read once for all of them; every token's sums are
    bit-identical to q8_tile's."""
    sig = _tile_signature(lut, tile_addr, scales_addr, blocks, xq, xi, xs, si, corr, ci, sums, oi)
    return (sig, _tile_codegen(False, GROUP)) if sig else None


@intrinsic
def expand_q4_tile(typingctx, lut, tile_addr, words, out):
    """out[0 : 32·words] = the 4-bit code tile at `tile_addr` (words × 16) as a Q8_0-layout value tile: word 2w of each
    row = its grid values + 128 at positions 8w + 0,2,4,6, word 2w + 1 at 8w + 1,3,5,7 (one vpshufb each), so that
    several tokens run q8_tile over codes expanded once."""
    if not (lut == _U8 and out == types.Array(types.uint32, 1, "C") and isinstance(tile_addr, types.Integer)
            and isinstance(words, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        intp = context.get_value_type(types.intp)
        shuffle = _byte_shuffle(builder)
        table = builder.load(builder.bitcast(_data(context, builder, ty[0], args[0]), _VB.as_pointer()), align=1)
        codes = builder.inttoptr(context.cast(builder, args[1], ty[1], types.int64), _VI.as_pointer())
        out = builder.bitcast(_data(context, builder, ty[3], args[3]), _VI.as_pointer())
        low = ir.Constant(_VI, [0x0F0F0F0F] * TILE)
        with cgutils.for_range(builder, context.cast(builder, args[2], ty[2], types.intp)) as loop:
            w = loop.index
            word = builder.load(builder.gep(codes, [w]), align=4)
            halves = (builder.and_(word, low), builder.and_(builder.lshr(word, ir.Constant(_VI, [4] * TILE)), low))
            for k, half in enumerate(halves):
                values = shuffle(table, half)
                at = builder.add(builder.mul(w, ir.Constant(intp, 2)), ir.Constant(intp, k))
                builder.store(values, builder.gep(out, [at]), align=4)
        return context.get_dummy_value()

    return types.void(lut, tile_addr, words, out), codegen


ALL_ROWS = np.zeros(0, np.int64)  # head's `columns` for a table whose row r is logit r


@njit(inline="always", **_OPTS)
def _column(columns, r):
    return columns[r] if columns.shape[0] > 0 else r


def _head_kernel(parallel: bool):
    loop = prange if parallel else range

    @njit(parallel=parallel, **_OPTS)
    def head(tiles, scales, lut, x, out, nibbles, columns):
        """out[:, columns] = x (T, d) · tableᵀ, x quantized to int8 per block first; `tiles` are 4-bit codes
        (`nibbles`, repack_q4) or Q8_0 values (repack_q8); `columns[r]` is where table row r's logit goes (empty:
        column r, the table fills out), so a table of some of the vocabulary's rows writes them in place. Tasks are
        runs of TILES_PER_TASK tiles, each doing every token (a tile stays in L1 for all of them); for several
        tokens a 4-bit tile is expanded to bytes once (expand_q4_tile) and the tokens run GROUP at a time
        (q8_tile_group), the rest one by one."""
        t_all, d = x.shape
        vocab = columns.shape[0] if columns.shape[0] > 0 else out.shape[1]
        n_tiles, words, blocks = tiles.shape[0], tiles.shape[1], scales.shape[1]
        xq = np.empty((t_all, d), np.int8)
        xs = np.empty((t_all, blocks), np.float32)
        corr = np.empty((t_all, blocks), np.int32)
        quantize_tokens(x, xq, xs, corr)
        xq4, xs1, corr1 = xq.reshape(-1).view(np.int32), xs.reshape(-1), corr.reshape(-1)
        tiles_at, scales_at = address(tiles), address(scales)
        grouped = t_all // GROUP * GROUP
        for task in loop((n_tiles + TILES_PER_TASK - 1) // TILES_PER_TASK):
            sums = np.empty(GROUP * TILE, np.float32)
            expanded = np.empty(TILE * d // 4, np.uint32)  # one 4-bit tile as Q8_0 values, for several tokens
            for b in range(task * TILES_PER_TASK, min((task + 1) * TILES_PER_TASK, n_tiles)):
                rows = min(TILE, vocab - b * TILE)
                at, scales_b = tiles_at + b * words * TILE * 4, scales_at + b * blocks * TILE * 4
                if nibbles and t_all == 1:
                    q4_tile(lut, at, scales_b, blocks, xq4, 0, xs1, 0, corr1, 0, sums, 0)
                    for l in range(rows):
                        out[0, _column(columns, b * TILE + l)] = sums[l]
                    continue
                if nibbles:
                    expand_q4_tile(lut, at, words, expanded)
                    at = address(expanded)
                for t0 in range(0, grouped, GROUP):
                    q8_tile_group(lut, at, scales_b, blocks, xq4, t0 * (d // 4), xs1, t0 * blocks, corr1, t0 * blocks,
                                  sums, 0)
                    for t in range(GROUP):
                        for l in range(rows):
                            out[t0 + t, _column(columns, b * TILE + l)] = sums[t * TILE + l]
                for t in range(grouped, t_all):
                    q8_tile(lut, at, scales_b, blocks, xq4, t * (d // 4), xs1, t * blocks, corr1, t * blocks, sums, 0)
                    for l in range(rows):
                        out[t, _column(columns, b * TILE + l)] = sums[l]

    return head


head_serial = _head_kernel(False)
head_parallel = _head_kernel(True)
