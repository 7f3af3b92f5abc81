"""Numba CPU kernels of the numba backend, each the fast twin of an op in numpy_ref.py.

Binary linears use 8-bit lookup tables (LUT-8): for every 8 inputs, a 256-entry table holds all signed sums
±x0 ± … ± x7, built with 255 additions; each packed sign byte of a row is then one table lookup instead of eight
multiply-adds. This is exact float32 arithmetic (only the summation order differs from a dot product). Bit j of
sign byte b is column 8b+j (bit 1 = −1), which is exactly the file's uint32 words viewed as little-endian bytes.

Several tokens (a batched decoding step, a prefill) go through a linear together (binary_path_lanes): the tables
then hold LANES tokens' sums side by side, so one sign byte selects a vector of LANES sums and is read once for all
of them. Numba's loops do not keep such a vector (or the head's per-token dot products) in registers, so the inner
loops are small LLVM intrinsics (lanes_table, lanes_lookup, f16_dots_*), like the F16 widening below.

Numba has no float16 on the CPU: F16 tables are read as uint16 and widened in-kernel by `f16_bits_to_f32`, an LLVM
`fpext half` that LLVM vectorizes (vcvtph2ps with F16C).

The row-parallel kernels exist twice, built by `_kernels(parallel)`: SERIAL (plain loops: no thread launch at all,
best for one thread and for small linears) and PARALLEL (prange over rows). Both are cached on disk (cache=True);
the loop construct is a closure variable, which keeps their cache entries apart.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .numba_decode import attention_scores, exp32

_OPTS = dict(fastmath=True, cache=True, nogil=True)
ROW_BLOCK = 64  # vocabulary rows per task in the Q8_0 head


@intrinsic
def f16_bits_to_f32(typingctx, bits):
    """IEEE half (given as its uint16 bits) → float32, exact."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


# --- lookup tables -------------------------------------------------------------------------------------------------
@njit(inline="always", **_OPTS)
def _fill_table(xs, tab, g):
    """tab[g·256 + b] = Σ_j (bit j of b ? −1 : +1)·xs[8g + j], built by doubling: entries with bit j set are
    the entries below them minus 2·x_j."""
    base = g * 256
    total = np.float32(0.0)
    for j in range(8):
        total += xs[g * 8 + j]
    tab[base] = total
    size = 1
    for j in range(8):
        d = 2 * xs[g * 8 + j]
        for b in range(size):
            tab[base + size + b] = tab[base + b] - d
        size *= 2


# --- small ops -----------------------------------------------------------------------------------------------------
@njit(**_OPTS)
def rms_norm(x, w, eps, out):
    """Rows of x (R, d) scaled to unit RMS, times w."""
    rows, d = x.shape
    for i in range(rows):
        ss = np.float32(0.0)
        for k in range(d):
            ss += x[i, k] * x[i, k]
        inv = np.float32(1.0 / math.sqrt(ss / d + eps))
        for k in range(d):
            out[i, k] = x[i, k] * inv * w[k]


@njit(**_OPTS)
def rope(x, cos, sin, out):
    """Rotate-half RoPE on x (T, H, D) with cos/sin (T, D/2)."""
    t_all, heads, d = x.shape
    half = d // 2
    for t in range(t_all):
        for h in range(heads):
            for k in range(half):
                a, b = x[t, h, k], x[t, h, k + half]
                out[t, h, k] = a * cos[t, k] - b * sin[t, k]
                out[t, h, k + half] = b * cos[t, k] + a * sin[t, k]


@njit(error_model="numpy", **_OPTS)
def glu(gate, up, gelu, out):
    """act(gate) * up, act = silu or (gelu=True) tanh-approximated GELU, written as g·sigmoid(2z) (= g·(1 + tanh z)/2,
    z = √(2/π)·(g + 0.044715·g³)). Both go through exp32 and divisions without numba's zero check
    (error_model="numpy"), so the loops vectorize (a libm call or a checked division per element would not)."""
    rows, f = gate.shape
    for i in range(rows):
        if gelu:
            for k in range(f):
                g = gate[i, k]
                z2 = np.float32(1.5957691216057308) * (g + np.float32(0.044715) * g * g * g)
                out[i, k] = g / (np.float32(1.0) + exp32(-z2)) * up[i, k]
        else:
            for k in range(f):
                g = gate[i, k]
                out[i, k] = g / (np.float32(1.0) + exp32(-g)) * up[i, k]


# --- embedding tables and the output head (F16 bits, F32, Q8_0 bytes) ----------------------------------------------
@njit(**_OPTS)
def embed_f16(table, ids, out):
    for t in range(ids.shape[0]):
        for k in range(table.shape[1]):
            out[t, k] = f16_bits_to_f32(table[ids[t], k])


@njit(**_OPTS)
def embed_q8(raw, qs, ids, out):
    """Q8_0 rows: blocks of 34 bytes, a little-endian f16 scale then 32 int8 (qs is raw viewed as int8)."""
    for t in range(ids.shape[0]):
        row = ids[t]
        for b in range(raw.shape[1] // 34):
            o = b * 34
            scale = f16_bits_to_f32(np.uint16(raw[row, o] | (np.uint16(raw[row, o + 1]) << 8)))
            for k in range(32):
                out[t, b * 32 + k] = scale * np.float32(qs[row, o + 2 + k])


@njit(inline="always", **_OPTS)
def _q8_dot(raw, qs, v, x, acc):
    """Q8_0 row v · x: scale·int8·x summed into 32 lanes across all blocks, reduced once at the end (a horizontal
    sum per block halves the speed)."""
    for k in range(32):
        acc[k] = 0.0
    for b in range(raw.shape[1] // 34):
        o = b * 34
        scale = f16_bits_to_f32(np.uint16(raw[v, o] | (np.uint16(raw[v, o + 1]) << 8)))
        for k in range(32):
            acc[k] += scale * np.float32(qs[v, o + 2 + k]) * x[b * 32 + k]
    total = np.float32(0.0)
    for k in range(32):
        total += acc[k]
    return total


# --- binary linear: one path, one token -----------------------------------------------------------------------------
def _decode_kernel(parallel: bool):
    """The one-token product, its row loops `loop` = prange (parallel) or range (serial)."""
    loop = prange if parallel else range

    @njit(parallel=parallel, **_OPTS)
    def binary_path_decode(x, s_in, v_bytes, s_mid, u_bytes, s_out, xs, tab, h, y, accumulate):
        """y (+)= s_out ⊙ U·(s_mid ⊙ V·(s_in ⊙ x)) for one token. xs, tab, h are scratch of at least
        8·bytes, 256·bytes and 8·bytes(U) floats."""
        n = x.shape[0]
        r, nb1 = v_bytes.shape
        m, nb2 = u_bytes.shape
        for j in range(n):
            xs[j] = x[j] * s_in[j]
        for j in range(n, nb1 * 8):
            xs[j] = 0.0
        for g in range(nb1):  # tables are cheap next to the lookups: not worth a thread launch
            _fill_table(xs, tab, g)
        for i in loop(r):
            acc = np.float32(0.0)
            for g in range(nb1):
                acc += tab[g * 256 + v_bytes[i, g]]
            h[i] = acc * s_mid[i]
        for j in range(r, nb2 * 8):
            h[j] = 0.0
        for g in range(nb2):
            _fill_table(h, tab, g)
        for i in loop(m):
            acc = np.float32(0.0)
            for g in range(nb2):
                acc += tab[g * 256 + u_bytes[i, g]]
            if accumulate:
                y[i] += acc * s_out[i]
            else:
                y[i] = acc * s_out[i]

    return binary_path_decode


_decode_serial = _decode_kernel(False)


# --- binary linear: one path, several tokens at once ------------------------------------------------------------
LANES = 8  # tokens per pass of the multi-token kernel: one 256-bit vector of float32 per table entry
LANE_TILE = 4  # sign-byte groups whose tables are built and read together (4 × 256 × LANES floats = 32 KB: L1)


def _lanes_at(context, builder, arrty, arr, index):
    """Pointer to arr[index : index + LANES] of a float32 C-contiguous 1-D array, as <LANES x float>*."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [index]), ir.VectorType(ir.FloatType(), LANES).as_pointer())


def _lanes_args(*args):
    """The argument types the lane intrinsics accept: float32 C-contiguous 1-D arrays and integer offsets."""
    want = types.Array(types.float32, 1, "C")
    return all(a == want if i % 2 == 0 else isinstance(a, types.Integer) for i, a in enumerate(args))


@intrinsic
def lanes_table(typingctx, tab, ti, xs, xi):
    """tab[ti + b·LANES : … + LANES] for b < 256 = Σ_j (bit j of b ? −1 : +1)·xs[xi + j·LANES : … + LANES]: the
    256-entry table of one sign byte for LANES tokens at once. Each half-byte's 16 signed sums are built by doubling
    in registers; entry 16h + l is low[l] + high[h], one addition and one store (doubling through memory would load
    every entry back)."""
    if not _lanes_args(tab, ti, xs, xi):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        intp = context.get_value_type(types.intp)
        start, first = (context.cast(builder, args[k], ty[k], types.intp) for k in (1, 3))

        def at(arg, index):
            return _lanes_at(context, builder, ty[arg], args[arg], index)

        x = [builder.load(at(2, builder.add(first, ir.Constant(intp, j * LANES))), align=4) for j in range(8)]

        def sums(part):  # the 16 signed sums of x[part], x[part+1], x[part+2], x[part+3]
            table = [builder.fadd(builder.fadd(x[part], x[part + 1]), builder.fadd(x[part + 2], x[part + 3]))]
            for j in range(4):
                twice = builder.fadd(x[part + j], x[part + j])
                table += [builder.fsub(v, twice) for v in table]
            return table

        low, high = sums(0), sums(4)
        for h in range(16):
            for lo in range(16):
                entry = builder.add(start, ir.Constant(intp, (16 * h + lo) * LANES))
                builder.store(builder.fadd(low[lo], high[h]), at(0, entry), align=4)
        return context.get_dummy_value()

    return types.void(tab, ti, xs, xi), codegen


@intrinsic
def lanes_lookup(typingctx, out, oi, tab, signs, g0, g1):
    """out[oi:oi+LANES] += Σ_{g0 ≤ g < g1} tab[((g − g0)·256 + signs[g])·LANES :][:LANES]: one table vector per sign
    byte, summed in a register in the order of g (numba's loop would round-trip the sum through memory)."""
    if not (_lanes_args(out, oi, tab, g0) and isinstance(signs, types.Array) and signs.dtype == types.uint8
            and signs.ndim == 1 and signs.layout == "C" and isinstance(g1, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        intp = context.get_value_type(types.intp)
        first, last = (context.cast(builder, args[k], ty[k], types.intp) for k in (4, 5))
        dst = _lanes_at(context, builder, ty[0], args[0], context.cast(builder, args[1], ty[1], types.intp))
        acc = cgutils.alloca_once(builder, dst.type.pointee)
        builder.store(builder.load(dst, align=4), acc)
        sign_data = context.make_array(ty[3])(context, builder, args[3]).data
        with cgutils.for_range_slice(builder, first, last, ir.Constant(intp, 1)) as (g, _):
            byte = builder.zext(builder.load(builder.gep(sign_data, [g])), intp)
            slot = builder.add(builder.mul(builder.sub(g, first), ir.Constant(intp, 256)), byte)
            entry = _lanes_at(context, builder, ty[2], args[2], builder.mul(slot, ir.Constant(intp, LANES)))
            builder.store(builder.fadd(builder.load(acc), builder.load(entry, align=4)), acc)
        builder.store(builder.load(acc), dst, align=4)
        return context.get_dummy_value()

    return types.void(out, oi, tab, signs, g0, g1), codegen


@njit(inline="always", **_OPTS)
def _lane_products(xs, signs, out, tab):
    """out[i·LANES + t] = Σ_k (sign ik)·xs[k·LANES + t] for rows i of `signs` (packed bytes), all LANES lanes at
    once: each sign byte is read once and adds one table vector. Tables are built LANE_TILE groups at a time, so
    they stay in L1 while every row reads them; each lane sums the groups in order, whatever the lane count."""
    rows, nb = signs.shape
    for k in range(rows * LANES):
        out[k] = 0.0
    for g0 in range(0, nb, LANE_TILE):
        g1 = min(g0 + LANE_TILE, nb)
        for g in range(g0, g1):
            lanes_table(tab, (g - g0) * 256 * LANES, xs, 8 * g * LANES)
        for i in range(rows):
            lanes_lookup(out, i * LANES, tab, signs[i], g0, g1)


@njit(inline="always", **_OPTS)
def _binary_path_lanes(x, t0, s_in, v_bytes, s_mid, u_bytes, s_out, y, accumulate):
    """y[t] (+)= s_out ⊙ U·(s_mid ⊙ V·(s_in ⊙ x[t])) for tokens t0 .. t0+LANES-1 (those that exist). Inputs are
    laid out input-major, LANES tokens side by side; unused lanes and padding inputs stay 0."""
    t_all, n = x.shape
    r, nb1 = v_bytes.shape
    m, nb2 = u_bytes.shape
    lanes = min(LANES, t_all - t0)
    xs = np.zeros(nb1 * 8 * LANES, dtype=np.float32)
    h = np.zeros(max(nb2 * 8, r) * LANES, dtype=np.float32)
    out = np.empty(m * LANES, dtype=np.float32)
    tab = np.empty(LANE_TILE * 256 * LANES, dtype=np.float32)
    for j in range(n):
        for t in range(lanes):
            xs[j * LANES + t] = x[t0 + t, j] * s_in[j]
    _lane_products(xs, v_bytes, h, tab)
    for i in range(r):
        for t in range(LANES):
            h[i * LANES + t] *= s_mid[i]
    _lane_products(h, u_bytes, out, tab)
    for t in range(lanes):
        for i in range(m):
            if accumulate:
                y[t0 + t, i] += out[i * LANES + t] * s_out[i]
            else:
                y[t0 + t, i] = out[i * LANES + t] * s_out[i]


# --- the output head: one vocabulary row against several tokens -------------------------------------------------
DOT_TOKENS = 8  # tokens whose dot products with two rows run together (16 vector accumulators in registers)
DOT_WIDTH = 16  # floats per vector: one 512-bit register (two 256-bit ones where the CPU has no AVX-512)
_F32_VECTOR = types.Array(types.float32, 1, "C")


def _f16_dots(rows: int):
    """An intrinsic f(table, v, xs, dots): dots[r·DOT_TOKENS + t] = Σ_k table[v + r, k]·xs[t·w + k] over the whole
    DOT_WIDTH chunks of a row (k < d − d mod DOT_WIDTH), for `rows` rows of an F16 table (uint16 bits, widened in
    registers) and DOT_TOKENS tokens (xs token-major, row length w = len(xs) / DOT_TOKENS). Each chunk of x is loaded
    once for all rows, each chunk of a row once for all tokens, and every (row, token) sum stays in its own vector
    register; numba's loops would keep one scalar reduction per token, which runs at the latency of its additions."""

    @intrinsic
    def f16_dots(typingctx, table, v, xs, dots):
        if not (isinstance(table, types.Array) and table.dtype == types.uint16 and table.ndim == 2
                and table.layout == "C" and isinstance(v, types.Integer) and xs == dots == _F32_VECTOR):
            return None

        def codegen(context, builder, signature, args):
            ty = signature.args
            tab = context.make_array(ty[0])(context, builder, args[0])
            xs_a, dots_a = (context.make_array(_F32_VECTOR)(context, builder, a) for a in args[2:])
            intp = context.get_value_type(types.intp)
            vector = ir.VectorType(ir.FloatType(), DOT_WIDTH)
            halves = ir.VectorType(ir.IntType(16), DOT_WIDTH)
            d = cgutils.unpack_tuple(builder, tab.shape, 2)[1]
            row_bytes = cgutils.unpack_tuple(builder, tab.strides, 2)[0]
            width = builder.udiv(cgutils.unpack_tuple(builder, xs_a.shape, 1)[0], ir.Constant(intp, DOT_TOKENS))
            first = context.cast(builder, args[1], ty[1], types.intp)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                                 f"llvm.fma.v{DOT_WIDTH}f32")
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(vector, [0.0] * DOT_WIDTH))
                     for _ in range(DOT_TOKENS)] for _ in range(rows)]
            starts = [builder.bitcast(builder.gep(builder.bitcast(tab.data, ir.IntType(8).as_pointer()),
                                                  [builder.mul(builder.add(first, ir.Constant(intp, r)), row_bytes)]),
                                      ir.IntType(16).as_pointer()) for r in range(rows)]
            with cgutils.for_range(builder, builder.udiv(d, ir.Constant(intp, DOT_WIDTH))) as loop:
                k = builder.mul(loop.index, ir.Constant(intp, DOT_WIDTH))
                w = [builder.fpext(builder.bitcast(builder.load(builder.bitcast(builder.gep(start, [k]),
                                                                                halves.as_pointer()), align=2),
                                                   ir.VectorType(ir.HalfType(), DOT_WIDTH)), vector)
                     for start in starts]
                for t in range(DOT_TOKENS):
                    at = builder.gep(xs_a.data, [builder.add(builder.mul(ir.Constant(intp, t), width), k)])
                    x = builder.load(builder.bitcast(at, vector.as_pointer()), align=4)
                    for r in range(rows):
                        builder.store(builder.call(fma, [w[r], x, builder.load(accs[r][t])]), accs[r][t])
            for r in range(rows):
                for t in range(DOT_TOKENS):  # halves added pairwise down to one lane
                    total, n = builder.load(accs[r][t]), DOT_WIDTH
                    while n > 1:
                        n //= 2
                        parts = [ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(a, a + n))) for a in (0, n)]
                        total = builder.fadd(*(builder.shuffle_vector(total, total, p) for p in parts))
                    builder.store(builder.extract_element(total, ir.Constant(ir.IntType(32), 0)),
                                  builder.gep(dots_a.data, [ir.Constant(intp, r * DOT_TOKENS + t)]))
            return context.get_dummy_value()

        return types.void(table, v, xs, dots), codegen

    return f16_dots


f16_dots_1, f16_dots_2 = _f16_dots(1), _f16_dots(2)


@njit(inline="always", **_OPTS)
def _attend_head(q, t, h, keys, values, qp, window, scale, softcap, out):
    """out[t, h] = causal attention of query head h of token t, at position qp, over keys/values (KV, ctx, D)
    (grouped: query head h reads kv head h // (H / KV)); window > 0 keeps only the last `window` positions."""
    d = q.shape[2]
    g = h // (q.shape[1] // keys.shape[0])
    lo = max(0, qp - window + 1) if window > 0 else 0
    n = qp + 1 - lo
    p = np.empty(n, dtype=np.float32)
    best = attention_scores(q[t, h], keys[g], lo, n, scale, softcap, p)
    total = np.float32(0.0)
    for j in range(n):
        p[j] = exp32(p[j] - best)
        total += p[j]
    for k in range(d):
        out[t, h, k] = 0.0
    for j in range(n):
        w = p[j] / total
        for k in range(d):
            out[t, h, k] += w * values[g, lo + j, k]


# --- row-parallel kernels ------------------------------------------------------------------------------------------
def _kernels(parallel: bool) -> SimpleNamespace:
    """The row-parallel kernels, with `loop` = prange (parallel) or range (serial)."""
    loop = prange if parallel else range

    @njit(parallel=parallel, **_OPTS)
    def binary_path_lanes(x, s_in, v_bytes, s_mid, u_bytes, s_out, y, accumulate):
        """The same product for several tokens (a batched decoding step, a prefill): LANES tokens per task, each
        sign byte read once for all of them (see _lane_products)."""
        for c in loop((x.shape[0] + LANES - 1) // LANES):
            _binary_path_lanes(x, c * LANES, s_in, v_bytes, s_mid, u_bytes, s_out, y, accumulate)

    @njit(parallel=parallel, **_OPTS)
    def attention(q, keys, values, pos0, window, scale, softcap, out):
        """Causal GQA attention of q (T, H, D) at positions pos0.. over keys/values (KV, ctx, D) of one layer
        (already holding this step's keys); window > 0 keeps only the last `window` positions."""
        t_all, heads, d = q.shape
        for idx in loop(t_all * heads):
            _attend_head(q, idx // heads, idx % heads, keys, values, pos0 + idx // heads, window, scale, softcap, out)

    @njit(parallel=parallel, **_OPTS)
    def attention_batch(q, k, v, seq, pos, keys, values, layer, window, scale, softcap, out):
        """Attention of several sequences' tokens in one call: token t of q/k/v (T, heads or KV, D) belongs to
        sequence seq[t] at position pos[t]; keys[b], values[b] are sequence b's caches (layers, KV, ctx, D). Stores
        every token's keys/values, then attends as `attention` does, each token over its own sequence's cache."""
        t_all, heads, d = q.shape
        for t in range(t_all):
            keys[seq[t]][layer, :, pos[t]] = k[t]
            values[seq[t]][layer, :, pos[t]] = v[t]
        for idx in loop(t_all * heads):
            t = idx // heads
            _attend_head(q, t, idx % heads, keys[seq[t]][layer], values[seq[t]][layer], pos[t], window, scale,
                         softcap, out)


    @njit(parallel=parallel, **_OPTS)
    def head_f16(table, x, out):
        """out (T, V) = x (T, d) · tableᵀ with the table as F16 bits (V, d). One token: widen and multiply in one
        pass (vcvtph2ps + FMA); several: widen each row once into a buffer and reuse it for every token."""
        t_all, d = x.shape
        for v in loop(table.shape[0]):
            if t_all == 1:
                acc = np.float32(0.0)
                for k in range(d):
                    acc += f16_bits_to_f32(table[v, k]) * x[0, k]
                out[0, v] = acc
            else:
                row = np.empty(d, dtype=np.float32)
                for k in range(d):
                    row[k] = f16_bits_to_f32(table[v, k])
                for t in range(t_all):
                    acc = np.float32(0.0)
                    for k in range(d):
                        acc += row[k] * x[t, k]
                    out[t, v] = acc

    @njit(parallel=parallel, **_OPTS)
    def head_f16_dots(table, x, out):
        """head_f16 for a batched decoding step: tasks are blocks of ROW_BLOCK vocabulary rows, taken two at a time
        against DOT_TOKENS tokens at a time (f16_dots_2); tokens are zero-padded to whole vectors, and a row's last
        d mod DOT_WIDTH columns are added after its vector part."""
        t_all, d = x.shape
        vocab = table.shape[0]
        full = d // DOT_WIDTH * DOT_WIDTH
        width = (d + DOT_WIDTH - 1) // DOT_WIDTH * DOT_WIDTH
        groups = (t_all + DOT_TOKENS - 1) // DOT_TOKENS
        xs = np.zeros(groups * DOT_TOKENS * width, dtype=np.float32)
        for t in range(t_all):
            for k in range(d):
                xs[t * width + k] = x[t, k]
        for blk in loop((vocab + ROW_BLOCK - 1) // ROW_BLOCK):
            dots = np.empty(2 * DOT_TOKENS, dtype=np.float32)
            end = min((blk + 1) * ROW_BLOCK, vocab)
            for v in range(blk * ROW_BLOCK, end, 2):
                rows = min(2, end - v)
                for gi in range(groups):
                    xg = xs[gi * DOT_TOKENS * width:(gi + 1) * DOT_TOKENS * width]
                    if rows == 2:
                        f16_dots_2(table, v, xg, dots)
                    else:
                        f16_dots_1(table, v, xg, dots)
                    for r in range(rows):
                        for t in range(min(DOT_TOKENS, t_all - gi * DOT_TOKENS)):
                            acc = dots[r * DOT_TOKENS + t]
                            for k in range(full, d):
                                acc += f16_bits_to_f32(table[v + r, k]) * x[gi * DOT_TOKENS + t, k]
                            out[gi * DOT_TOKENS + t, v + r] = acc

    @njit(parallel=parallel, **_OPTS)
    def head_f32(table, x, out):
        t_all, d = x.shape
        for v in loop(table.shape[0]):
            for t in range(t_all):
                acc = np.float32(0.0)
                for k in range(d):
                    acc += table[v, k] * x[t, k]
                out[t, v] = acc

    @njit(parallel=parallel, **_OPTS)
    def head_q8(raw, qs, x, out):
        """The head over Q8_0 rows (blocks of a f16 scale and 32 int8); tasks are blocks of ROW_BLOCK rows, each
        with its own lane accumulator for _q8_dot."""
        t_all = x.shape[0]
        vocab = raw.shape[0]
        for blk in loop((vocab + ROW_BLOCK - 1) // ROW_BLOCK):
            acc = np.empty(32, dtype=np.float32)
            for v in range(blk * ROW_BLOCK, min((blk + 1) * ROW_BLOCK, vocab)):
                for t in range(t_all):
                    out[t, v] = _q8_dot(raw, qs, v, x[t], acc)

    return SimpleNamespace(binary_path_decode=_decode_serial if not parallel else _decode_kernel(True),
                           binary_path_lanes=binary_path_lanes,
                           attention=attention, attention_batch=attention_batch, head_f16=head_f16,
                           head_f16_dots=head_f16_dots, head_f32=head_f32, head_q8=head_q8)


SERIAL = _kernels(False)
PARALLEL = _kernels(True)
