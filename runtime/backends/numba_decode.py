"""Every decoder block of a decoding step in one compiled call: the numba backend's decode step.

Run op by op, one token is ~14 backend calls per block (~420 on SmolLM2-135M), each a Python call and a numba dispatch
around a few microseconds of work; with threads each would also be a parallel region that wakes a sleeping thread.
Here the blocks of a step run inside one compiled walk, `_blocks(net, worker, x, positions, caches)`, called by each
worker of `decode_threads` or directly for one worker: x (B, hidden) holds the step's embedded tokens on entry and the
last block's outputs on exit. Token t is the next token of its own sequence, at positions[t], whose KV cache gets the
token's keys and values; caches[t] holds that cache's key and value addresses and its context length (an int64 row, so
the kernels need no typed containers). A single sequence decodes with B = 1; a server's batched step runs all its
sequences in one call, so each chunk of sign tiles is read from memory once for all of them.

Threads: one parallel region per step. Every worker (`prange(workers)`) walks the same sequence of phases; a phase is a
list of chunks (tiles of rows of one stage of the binary linears, kv heads, query heads) cut into one contiguous range
per worker. A worker claims chunks one at a time from its own range's atomic counter, then from the other ranges'
(`_claim`), adds how many it finished to the phase's done count once, and leaves the phase when all are done (`_done`).
Its own range keeps a worker on few paths (fewer lookup tables built twice) and its counter's cache line on its own
core: a line that moves between cores costs more than a chunk of lookups, and one counter shared by all workers and
claimed per chunk left the second core little to add (runtime/README.md, "Threads"). Taking from the others' ranges
keeps the sharing dynamic, so a worker that starts late, or whose core is taken by another process, delays the others
only by the chunk it holds: it then finds the finished phases' ranges exhausted and passes them. Small serial steps (an
RMSNorm of the residual, the lookup tables of a stage's input) are recomputed by each worker that needs them instead of
being a phase of their own; a worker computes them only for a phase in which it then claims a chunk, which is what makes
the redundant copies safe (while a phase has chunks left, its inputs cannot change).

A binary linear's stages run on LUT-16 (numba_lut16.py) where the CPU has AVX-512, else on the fixed-point kernels
(numba_fixed.py, AVX2): `STAGES` names the pair, chosen when this module is imported, since a kernel of the other
pair would not compile for the CPU. Both take the same arguments; they differ in rows per tile (TILE) and table floats
per 32 inputs (TABLE_WORD). With exact=True on a CPU without AVX-512 the backend decodes op by op on LUT-8
(numba_kernels.py): a fused LUT-8 variant of this walk measured 1.6-2.9× slower than op by op (runtime/README.md,
"Tried and not adopted"). Values are float32, as in the op-by-op kernels; only summation orders differ.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from llvmlite import binding, ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nqfmt import keys as K

from . import numba_lut16
from .numba_int8 import isa
from .numba_lut16 import _vector_at

AVX512 = numba_lut16.available()  # LUT-16 stages; attention's weighted sums in registers (weighted_sum)
if AVX512 or isa() is None:
    STAGES = "lut16"
    from .numba_lut16 import TILE, TABLE_WORD, build_tables, lookup_tile
else:
    STAGES = "fixed"
    from .numba_fixed import ROWS as TILE, TABLE_WORD, build_tables, lookup_tile

_OPTS = dict(fastmath=True, cache=True, nogil=True, error_model="numpy")  # no zero check per division: loops vectorize
CHUNK = 64 // TILE  # tiles per claimed chunk of a linear stage: 64 rows
PROMPT_TOKENS = 128  # the most tokens of a prompt a threaded call takes (runtime/README.md, "Short prompts on threads")
SPINS_BEFORE_YIELD = 2000  # busy-wait rounds before a waiting worker yields its core
_I64 = types.Array(types.int64, 1, "C")
_X86 = binding.get_default_triple().startswith(("x86_64", "i686", "i386"))

# columns of Net.paths (one row per binary path of every linear)
P_V, P_U, P_N, P_R, P_M, P_WN, P_WR, P_BR, P_BM, P_SIN, P_SMID, P_SOUT, P_MID, P_TAB = range(14)
# columns of Net.lins (one row per linear, layer-major in K.LINEARS order)
L_FIRST, L_COUNT, L_BIAS, L_OUT, L_TABS = range(5)
# columns of Net.layers
N_ATTN, N_FFN, N_QNORM, N_KNORM, N_POST_ATTN, N_POST_FFN, N_SLIDING = range(7)
# Net.ints
(C_HIDDEN, C_HEADS, C_KV, C_HEAD_DIM, C_FFN, C_GELU, C_QK_NORM, C_POST_NORMS, C_WINDOW, C_INV_GLOBAL, C_INV_LOCAL,
 C_W_Q, C_W_K, C_W_V, C_W_ATT, C_W_O, C_W_F, C_S_XS, C_S_SUMS, C_S_ACC, C_S_ROPE, C_S_Q, C_S_P, C_S_TAB,
 C_SLOT) = range(25)
# Net.floats
F_EPS, F_SCALE, F_SOFTCAP = range(3)
PHASES = 12  # phase slots per block
_LINEARS = len(K.LINEARS)
_Q, _K, _V, _O, _GATE, _UP, _DOWN = range(_LINEARS)


class Net(NamedTuple):
    """Everything the decode step reads, as flat arrays (built by decoder.FusedBlocks)."""

    paths: np.ndarray  # int64 (paths, 14)
    lins: np.ndarray  # int64 (layers·7, 5)
    layers: np.ndarray  # int64 (layers, 7)
    ints: np.ndarray  # int64, the C_* settings
    floats: np.ndarray  # float32, the F_* settings
    vecs: np.ndarray  # float32: scales, biases, norm weights, RoPE inverse frequencies
    work: np.ndarray  # float32 (tokens, ·), shared between workers (projections, attention output, GLU, middles)
    normed: np.ndarray  # float32 (workers, tokens, hidden): each worker's RMSNorm of the residual
    scratch: np.ndarray  # float32 (workers, ·), one row per worker
    counters: np.ndarray  # int64 per phase: done, then each worker range's claims, 64 bytes apart; zeroed per step


# --- synchronisation -----------------------------------------------------------------------------------------------
def _slot(context, builder, signature, args):
    arr = context.make_array(signature.args[0])(context, builder, args[0])
    return builder.gep(arr.data, [context.cast(builder, args[1], signature.args[1], types.intp)])


@intrinsic
def atomic_add(typingctx, arr, i, v):
    """arr[i] += v atomically (sequentially consistent); returns the old value."""
    if not (arr == _I64 and isinstance(i, types.Integer) and isinstance(v, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", _slot(context, builder, signature, args), value, "seq_cst")

    return types.int64(arr, i, v), codegen


@intrinsic
def atomic_load(typingctx, arr, i):
    """arr[i], read with acquire ordering (writes made before a matching atomic_add are visible after it)."""
    if not (arr == _I64 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_slot(context, builder, signature, args), "acquire", 8)

    return types.int64(arr, i), codegen


@intrinsic
def relax(typingctx, spins):
    """One round of a busy wait: a pause instruction (x86), or after SPINS_BEFORE_YIELD rounds sched_yield(), so a
    waiting worker gives its core to a thread that holds a chunk."""
    if not isinstance(spins, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        module = builder.module
        spins_value = context.cast(builder, args[0], signature.args[0], types.int64)
        late = builder.icmp_signed(">", spins_value, ir.Constant(ir.IntType(64), SPINS_BEFORE_YIELD))
        with builder.if_else(late) as (then, otherwise):
            with then:
                builder.call(cgutils.get_or_insert_function(module, ir.FunctionType(ir.IntType(32), []),
                                                            "sched_yield"), [])
            with otherwise:
                if _X86:
                    builder.call(cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), []),
                                                                "llvm.x86.sse2.pause"), [])
        return context.get_dummy_value()

    return types.void(spins), codegen


@njit(inline="always", **_OPTS)
def _claim(counters, phase, total, me, workers, k):
    """(chunk, k): the next of a phase's `total` chunks for worker `me`, or -1 when none is left. Worker w's range
    is chunks [total·w/W, total·(w+1)/W); a worker takes its own range first, then, once that is empty, the others'
    ranges in turn (k: how many ranges it has found empty). Each range's counter lives on its own cache line."""
    base = phase * 8 * (workers + 1)
    while k < workers:
        w = me + k
        if w >= workers:
            w -= workers
        hi = total * (w + 1) // workers
        c = total * w // workers + atomic_add(counters, base + 8 * (w + 1), 1)
        if c < hi:
            return c, k
        k += 1
    return -1, k


@njit(inline="always", **_OPTS)
def _done(counters, phase, workers, done, total):
    """Adds the `done` chunks this worker finished to the phase's count, then waits until all `total` are done."""
    base = phase * 8 * (workers + 1)
    if done > 0:
        atomic_add(counters, base, done)
    spins = 0
    while atomic_load(counters, base) < total:
        spins += 1
        relax(spins)


# --- one stage of a binary linear: LUT-16 or LUT-8 -----------------------------------------------------------------
@njit(inline="always", **_OPTS)
def _tables(src, so, words, tab, to):
    """The lookup tables of 32·words inputs src[so:] (zero past the matrix's columns) into tab[to:]."""
    build_tables(tab, to, src, so, 8 * words)


@njit(inline="always", **_OPTS)
def _rows(tab, to, addr, words, b0, b1, sums, si):
    """sums[si + TILE(b − b0) + l] = row TILE·b + l of a sign matrix times the inputs whose tables are at tab[to:], for
    tiles b0 ≤ b < b1 of the repacked tiles at addr."""
    for b in range(b0, b1):
        lookup_tile(tab, to, addr + 4 * TILE * words * b, words, sums, si + TILE * (b - b0))


@intrinsic
def _f32_pointer(typingctx, addr):
    """The int64 address `addr` as a float32 pointer (for numba.carray)."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[0], signature.args[0], types.int64)
        return builder.inttoptr(value, ir.FloatType().as_pointer())

    return types.CPointer(types.float32)(addr), codegen


@njit(inline="always", **_OPTS)
def _cache(net, caches, t, which):
    """Token t's keys (which 0) or values (1): a (layers, kv heads, ctx, head_dim) view of its cache."""
    ints = net.ints
    return carray(_f32_pointer(caches[t, which]), (net.layers.shape[0], ints[C_KV], caches[t, 2], ints[C_HEAD_DIM]))


# --- small ops -----------------------------------------------------------------------------------------------------
@intrinsic
def _f32_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits`."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always", **_OPTS)
def exp32(x):
    """e^x in float32 to ~1 ulp (Cephes' expf: x = n·ln2 + r, a degree-6 polynomial in r, times 2^n built from its
    bits), written so loops over it vectorize (libm's exp is a scalar call per element)."""
    x = min(max(np.float32(x), np.float32(-87.3)), np.float32(88.3762626647949))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1.0)) * _f32_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


@njit(inline="always", **_OPTS)
def attention_scores(q, keys, lo, n, scale, softcap, p):
    """p[j] = scale · q·keys[lo + j] (soft-capped when softcap > 0) for j < n, q (D,) and keys (ctx, D); returns the
    largest score."""
    best = -np.inf
    for j in range(n):
        s = np.float32(0.0)
        for k in range(q.shape[0]):
            s += q[k] * keys[lo + j, k]
        s *= scale
        if softcap > 0:
            s = softcap * math.tanh(s / softcap)
        p[j] = s
        best = max(best, s)
    return best


@intrinsic
def weighted_sum(typingctx, p, values, lo, n, out, chunks):
    """out[:16·chunks] = Σ_{j<n} p[j]·values[lo + j] for rows of exactly 16·chunks floats (chunks a literal): the
    row's sum stays in 2·chunks vector registers over all n positions (two positions per pass, each into its own
    set), where a loop over out for every few positions loads and stores out each time."""
    if not isinstance(chunks, types.IntegerLiteral):
        return None
    count = chunks.literal_value

    def codegen(context, builder, signature, args):
        ty = signature.args
        intp = context.get_value_type(types.intp)
        vf = ir.VectorType(ir.FloatType(), 16)
        pa, va, oa = (context.make_array(ty[k])(context, builder, args[k]) for k in (0, 1, 4))
        row = builder.extract_value(va.shape, 1)
        first, total = (context.cast(builder, args[k], ty[k], types.intp) for k in (2, 3))
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, vf]), "llvm.fma.v16f32")
        undef, zeros = ir.Constant(vf, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)
        sets = [[cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 16)) for _ in range(count)]
                for _ in range(2)]

        def add(j, accs):
            w = builder.shuffle_vector(builder.insert_element(undef, builder.load(builder.gep(pa.data, [j])),
                                                              ir.Constant(ir.IntType(32), 0)), undef, zeros)
            at = builder.mul(builder.add(first, j), row)
            for c, acc in enumerate(accs):
                v = builder.load(_vector_at(builder, va.data, builder.add(at, ir.Constant(intp, 16 * c)), vf), align=4)
                builder.store(builder.call(fma, [w, v, builder.load(acc)]), acc)

        pairs = builder.udiv(total, ir.Constant(intp, 2))
        with cgutils.for_range(builder, pairs) as loop:
            j = builder.mul(loop.index, ir.Constant(intp, 2))
            add(j, sets[0])
            add(builder.add(j, ir.Constant(intp, 1)), sets[1])
        odd = builder.icmp_unsigned("!=", builder.urem(total, ir.Constant(intp, 2)), ir.Constant(intp, 0))
        with builder.if_then(odd):
            add(builder.sub(total, ir.Constant(intp, 1)), sets[0])
        for c in range(count):
            value = builder.fadd(builder.load(sets[0][c]), builder.load(sets[1][c]))
            builder.store(value, _vector_at(builder, oa.data, ir.Constant(intp, 16 * c), vf), align=4)
        return context.get_dummy_value()

    return types.void(p, values, lo, n, out, chunks), codegen


@njit(inline="always", **_OPTS)
def _rms(src, so, n, vecs, wo, eps, dst, do):
    """dst[do:do+n] = src[so:so+n] / rms · vecs[wo:wo+n], in float32 as numba_kernels.rms_norm."""
    ss = np.float32(0.0)
    for k in range(n):
        ss += src[so + k] * src[so + k]
    inv = np.float32(1.0 / math.sqrt(ss / n + eps))
    out, a, w = dst[do:do + n], src[so:so + n], vecs[wo:wo + n]
    for k in range(n):
        out[k] = a[k] * inv * w[k]


@njit(inline="always", **_OPTS)
def _rope(v, vo, sc, co, half):
    """Rotate-half RoPE of v[vo : vo + 2·half] with cos at sc[co:], sin at sc[co + half:]."""
    lo, hi, cos, sin = v[vo:vo + half], v[vo + half:vo + 2 * half], sc[co:co + half], sc[co + half:co + 2 * half]
    for k in range(half):
        a, b = lo[k], hi[k]
        c, s = cos[k], sin[k]
        lo[k] = a * c - b * s
        hi[k] = b * c + a * s


# --- phases --------------------------------------------------------------------------------------------------------
# Each phase binds the Net's arrays to locals once: reading a tuple member inside a loop would touch its reference count
# on every access. Elementwise loops index slice views from 0 (`a = sc[at:at + n]`, then `a[i]`), never an array at a
# runtime offset (`sc[at + i]`): numba guards every signed index against wrapping around, LLVM drops the guard only
# where it can prove the index non-negative, and a guarded loop runs one element at a time. A phase runs the step's B
# tokens (rows of x, work and the worker's normed inputs). A chunk of a linear stage is some tiles of one path (or
# linear) for one token, chunks ordered path by path and, within a path, token by token: a worker's consecutive chunks
# mostly share a token, so its lookup tables (8 loads per word of signs) stay in L1, and the path's sign tiles (one load
# per word), read from memory for the first token, come from L2 for the others.
@njit(inline="always", **_OPTS)
def _stage_chunks(lins, paths, lin0, lin1, column):
    """Chunks of the V stages (column P_BR: per path) or U stages (P_BM: per linear) of linears lin0 ≤ l < lin1."""
    total = 0
    for li in range(lin0, lin1):
        first = lins[li, L_FIRST]
        if column == P_BR:
            for p in range(first, first + lins[li, L_COUNT]):
                total += (paths[p, P_BR] + CHUNK - 1) // CHUNK
        else:
            total += (paths[first, P_BM] + CHUNK - 1) // CHUNK
    return total


@njit(inline="always", **_OPTS)
def _v_phase(net, me, phase, lin0, lin1, src, so, sc, tokens):
    """mid_p[t] = s_mid ⊙ V_p·(s_in ⊙ src[t, so:]) for every path p of linears lin0 ≤ l < lin1 and token t, into the
    shared work."""
    ints, paths, lins, work, vecs, counters = net.ints, net.paths, net.lins, net.work, net.vecs, net.counters
    total = tokens * _stage_chunks(lins, paths, lin0, lin1, P_BR)
    xs, sums, tab = ints[C_S_XS], ints[C_S_SUMS], ints[C_S_TAB]
    held_p = held_t = -1
    workers, emptied, done = net.scratch.shape[0], 0, 0
    while True:
        c, emptied = _claim(counters, phase, total, me, workers, emptied)
        if c < 0:
            break
        p, t, b0 = -1, 0, 0
        for li in range(lin0, lin1):
            for q in range(lins[li, L_FIRST], lins[li, L_FIRST] + lins[li, L_COUNT]):
                if p < 0:
                    k = (paths[q, P_BR] + CHUNK - 1) // CHUNK
                    if c < k * tokens:
                        p, t, b0 = q, c // k, c % k * CHUNK
                    else:
                        c -= k * tokens
        n, r, wn = paths[p, P_N], paths[p, P_R], paths[p, P_WN]
        if held_p != p or held_t != t:
            s_in = paths[p, P_SIN]
            v, a, w = sc[xs:xs + 32 * wn], src[t, so:so + n], vecs[s_in:s_in + n]
            for j in range(n):
                v[j] = a[j] * w[j]
            for j in range(n, 32 * wn):
                v[j] = 0.0
            _tables(sc, xs, wn, sc, tab)
            held_p, held_t = p, t
        b1 = min(b0 + CHUNK, paths[p, P_BR])
        _rows(sc, tab, paths[p, P_V], wn, b0, b1, sc, sums)
        lo, hi = TILE * b0, min(TILE * b1, r)
        mid, s_mid = paths[p, P_MID], paths[p, P_SMID]
        out, a, w = work[t, mid + lo:mid + hi], sc[sums:sums + hi - lo], vecs[s_mid + lo:s_mid + hi]
        for i in range(hi - lo):
            out[i] = a[i] * w[i]
        done += 1
    _done(counters, phase, workers, done, total)


@njit(inline="always", **_OPTS)
def _u_tables(ints, lins, paths, work, li, t, sc, slot):
    """The tables of every path's middle vector of linear li for token t, into table slot `slot` of this worker."""
    base = ints[C_S_TAB] + slot * ints[C_SLOT]
    first = lins[li, L_FIRST]
    for p in range(first, first + lins[li, L_COUNT]):
        _tables(work[t], paths[p, P_MID], paths[p, P_WR], sc, base + paths[p, P_TAB])


@njit(inline="always", **_OPTS)
def _u_rows(ints, lins, paths, vecs, li, b0, b1, sc, slot, acc):
    """sc[acc + i − TILE·b0] = row i of linear li's output (Σ paths s_out ⊙ U·mid, + bias) for rows of tiles b0..b1,
    from the tables in slot `slot`."""
    base = ints[C_S_TAB] + slot * ints[C_SLOT]
    sums = ints[C_S_SUMS]
    first = lins[li, L_FIRST]
    lo, hi = TILE * b0, min(TILE * b1, paths[first, P_M])
    out = sc[acc:acc + hi - lo]
    for p in range(first, first + lins[li, L_COUNT]):
        s_out = paths[p, P_SOUT]
        _rows(sc, base + paths[p, P_TAB], paths[p, P_U], paths[p, P_WR], b0, b1, sc, sums)
        a, w = sc[sums:sums + hi - lo], vecs[s_out + lo:s_out + hi]
        for i in range(hi - lo):
            v = a[i] * w[i]
            out[i] = v if p == first else out[i] + v
    bias = lins[li, L_BIAS]
    if bias >= 0:
        w = vecs[bias + lo:bias + hi]
        for i in range(hi - lo):
            out[i] += w[i]


@njit(inline="always", **_OPTS)
def _u_phase(net, me, phase, lin0, lin1, x, residual, sc, tokens):
    """Outputs of linears lin0 ≤ l < lin1: added to the residual x (residual), else stored at the linear's L_OUT in
    the shared work."""
    ints, paths, lins, work, vecs, counters = net.ints, net.paths, net.lins, net.work, net.vecs, net.counters
    total = tokens * _stage_chunks(lins, paths, lin0, lin1, P_BM)
    acc = ints[C_S_ACC]
    held_li = held_t = -1
    workers, emptied, done = net.scratch.shape[0], 0, 0
    while True:
        c, emptied = _claim(counters, phase, total, me, workers, emptied)
        if c < 0:
            break
        li, t, b0 = -1, 0, 0
        for q in range(lin0, lin1):
            if li < 0:
                k = (paths[lins[q, L_FIRST], P_BM] + CHUNK - 1) // CHUNK
                if c < k * tokens:
                    li, t, b0 = q, c // k, c % k * CHUNK
                else:
                    c -= k * tokens
        if held_li != li or held_t != t:
            _u_tables(ints, lins, paths, work, li, t, sc, 0)
            held_li, held_t = li, t
        first = lins[li, L_FIRST]
        b1 = min(b0 + CHUNK, paths[first, P_BM])
        _u_rows(ints, lins, paths, vecs, li, b0, b1, sc, 0, acc)
        lo, hi = TILE * b0, min(TILE * b1, paths[first, P_M])
        a = sc[acc:acc + hi - lo]
        if residual:
            xt = x[t, lo:hi]
            for i in range(hi - lo):
                xt[i] += a[i]
        else:
            out = lins[li, L_OUT]
            wt = work[t, out + lo:out + hi]
            for i in range(hi - lo):
                wt[i] = a[i]
        done += 1
    _done(counters, phase, workers, done, total)


@njit(inline="always", **_OPTS)
def _glu_phase(net, me, phase, gate, sc, tokens):
    """f = act(gate) ⊙ up, rows chunked together: a chunk's gate and up rows come from table slots 0 and 1."""
    ints, paths, lins, work, vecs, counters = net.ints, net.paths, net.lins, net.work, net.vecs, net.counters
    first = lins[gate, L_FIRST]
    tiles = paths[first, P_BM]
    m = paths[first, P_M]
    per_token = (tiles + CHUNK - 1) // CHUNK
    total = tokens * per_token
    acc = ints[C_S_ACC]
    up_acc = acc + TILE * CHUNK
    f = ints[C_W_F]
    gelu = ints[C_GELU] != 0
    held_t = -1
    workers, emptied, done = net.scratch.shape[0], 0, 0
    while True:
        c, emptied = _claim(counters, phase, total, me, workers, emptied)
        if c < 0:
            break
        t = c // per_token
        if held_t != t:
            _u_tables(ints, lins, paths, work, gate, t, sc, 0)
            _u_tables(ints, lins, paths, work, gate + 1, t, sc, 1)
            held_t = t
        b0 = c % per_token * CHUNK
        b1 = min(b0 + CHUNK, tiles)
        _u_rows(ints, lins, paths, vecs, gate, b0, b1, sc, 0, acc)
        _u_rows(ints, lins, paths, vecs, gate + 1, b0, b1, sc, 1, up_acc)
        lo = TILE * b0
        hi = min(TILE * b1, m)
        gate_v, up_v, out = sc[acc:acc + hi - lo], sc[up_acc:up_acc + hi - lo], work[t, f + lo:f + hi]
        if gelu:  # as numba_kernels.glu: g·sigmoid(2z), z = √(2/π)·(g + 0.044715·g³)
            for i in range(hi - lo):
                g = gate_v[i]
                z2 = np.float32(1.5957691216057308) * (g + np.float32(0.044715) * g * g * g)
                out[i] = g / (np.float32(1.0) + exp32(-z2)) * up_v[i]
        else:
            for i in range(hi - lo):
                g = gate_v[i]
                out[i] = g / (np.float32(1.0) + exp32(-g)) * up_v[i]
        done += 1
    _done(counters, phase, workers, done, total)


@njit(inline="always", **_OPTS)
def _kv_phase(net, me, phase, layer, positions, caches, sc, rope_at, tokens):
    """Per token and kv head: the key's RMSNorm (qk_norm) and RoPE, then key and value stored at the token's position
    in its sequence's cache."""
    ints, work, vecs, counters = net.ints, net.work, net.vecs, net.counters
    kv, d = ints[C_KV], ints[C_HEAD_DIM]
    knorm = net.layers[layer, N_KNORM]
    eps = net.floats[F_EPS]
    workers, emptied, done = net.scratch.shape[0], 0, 0
    while True:
        c, emptied = _claim(counters, phase, tokens * kv, me, workers, emptied)
        if c < 0:
            break
        t, g = c // kv, c % kv
        row = work[t]
        ko, vo = ints[C_W_K] + g * d, ints[C_W_V] + g * d
        if ints[C_QK_NORM]:
            _rms(row, ko, d, vecs, knorm, eps, row, ko)
        _rope(row, ko, sc, rope_at + 2 * d * t, d // 2)
        kc = _cache(net, caches, t, 0)[layer, g, positions[t]]
        vc = _cache(net, caches, t, 1)[layer, g, positions[t]]
        key, value = row[ko:ko + d], row[vo:vo + d]
        for k in range(d):
            kc[k] = key[k]
            vc[k] = value[k]
        done += 1
    _done(counters, phase, workers, done, tokens * kv)


@njit(inline="always", **_OPTS)
def _attention_output(p, vc, lo, n, inv, out):
    """out = inv · Σ_j p[j]·vc[lo + j] over n positions: by weighted_sum where the CPU has AVX-512 (32 vector
    registers hold its two sets of sums for a head of 64 or 128) and the head has that size, else four positions per
    pass over out."""
    d = out.shape[0]
    if AVX512 and (d == 64 or d == 128):
        if d == 64:
            weighted_sum(p, vc, lo, n, out, 4)
        else:
            weighted_sum(p, vc, lo, n, out, 8)
        for k in range(d):
            out[k] *= inv
        return
    for k in range(d):
        out[k] = 0.0
    j = 0
    while j + 4 <= n:  # four positions per pass over out: a quarter of its loads and stores
        w0, w1, w2, w3 = p[j] * inv, p[j + 1] * inv, p[j + 2] * inv, p[j + 3] * inv
        v0, v1, v2, v3 = vc[lo + j], vc[lo + j + 1], vc[lo + j + 2], vc[lo + j + 3]
        for k in range(d):
            out[k] += (w0 * v0[k] + w1 * v1[k]) + (w2 * v2[k] + w3 * v3[k])
        j += 4
    for j in range(j, n):
        wj = p[j] * inv
        for k in range(d):
            out[k] += wj * vc[lo + j, k]


@njit(inline="always", **_OPTS)
def _attention_phase(net, me, phase, layer, positions, caches, sc, rope_at, tokens):
    """Per token and query head: RMSNorm (qk_norm) and RoPE of the query, then causal attention over the token's
    cache (the last `window` positions on sliding layers), into the shared work."""
    ints, work, floats, vecs, counters = net.ints, net.work, net.floats, net.vecs, net.counters
    heads, d = ints[C_HEADS], ints[C_HEAD_DIM]
    group = heads // ints[C_KV]
    qo, po = ints[C_S_Q], ints[C_S_P]
    window = ints[C_WINDOW] if net.layers[layer, N_SLIDING] else 0
    qnorm = net.layers[layer, N_QNORM]
    scale, softcap, eps = floats[F_SCALE], floats[F_SOFTCAP], floats[F_EPS]
    q = sc[qo:qo + d]
    workers, emptied, done = net.scratch.shape[0], 0, 0
    while True:
        c, emptied = _claim(counters, phase, tokens * heads, me, workers, emptied)
        if c < 0:
            break
        t, h = c // heads, c % heads
        pos = positions[t]
        lo = max(0, pos - window + 1) if window > 0 else 0
        n = pos + 1 - lo
        p = sc[po:po + n]
        row = work[t]
        kc = _cache(net, caches, t, 0)[layer, h // group]  # (ctx, d) views
        vc = _cache(net, caches, t, 1)[layer, h // group]
        qh = row[ints[C_W_Q] + h * d:ints[C_W_Q] + (h + 1) * d]
        for k in range(d):
            q[k] = qh[k]
        if ints[C_QK_NORM]:
            _rms(q, 0, d, vecs, qnorm, eps, q, 0)
        _rope(q, 0, sc, rope_at + 2 * d * t, d // 2)
        best = attention_scores(q, kc, lo, n, scale, softcap, p)
        total = np.float32(0.0)
        for j in range(n):
            e = exp32(p[j] - best)
            p[j] = e
            total += e
        _attention_output(p, vc, lo, n, np.float32(1.0) / total, row[ints[C_W_ATT] + h * d:ints[C_W_ATT] + (h + 1) * d])
        done += 1
    _done(counters, phase, workers, done, tokens * heads)


@njit(inline="always", **_OPTS)
def _post_norm_phase(net, me, phase, norm, x, tokens):
    """x[t] += RMSNorm(the work's W_O buffer of token t), one chunk per token."""
    ints, work, counters = net.ints, net.work, net.counters
    o, n = ints[C_W_O], ints[C_HIDDEN]
    workers, emptied, done = net.scratch.shape[0], 0, 0
    while True:
        t, emptied = _claim(counters, phase, tokens, me, workers, emptied)
        if t < 0:
            break
        row = work[t]
        _rms(row, o, n, net.vecs, norm, net.floats[F_EPS], row, o)
        xt, a = x[t], row[o:o + n]
        for i in range(n):
            xt[i] += a[i]
        done += 1
    _done(counters, phase, workers, done, tokens)


# --- the step ------------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _rope_tables(vecs, inv_global, inv_local, half, pos, sc, at):
    """cos then sin of this position's angles, for global layers at sc[at:] and local (sliding) ones at
    sc[at + 2·half:]; the angle in float32 and its cosine in float64, as model.py (no fastmath here: it would
    shorten the cosine to float32)."""
    for which in range(2):
        inv = inv_global if which == 0 else inv_local
        for k in range(half):
            angle = np.float64(np.float32(pos) * vecs[inv + k])
            sc[at + 2 * half * which + k] = np.float32(math.cos(angle))
            sc[at + 2 * half * which + half + k] = np.float32(math.sin(angle))


@njit(**_OPTS)
def _blocks(net, worker, x, positions, caches):
    """Worker `worker`'s walk through every block for the step's tokens (all workers walk it; see the module
    docstring). A block's two residual halves, attention and feed-forward, run through one loop body: numba inlines
    a phase at each of its call sites, and fewer sites compile faster."""
    ints, layers, vecs, work = net.ints, net.layers, net.vecs, net.work
    sc = net.scratch[worker]
    normed = net.normed[worker]
    tokens = x.shape[0]
    hidden, d = ints[C_HIDDEN], ints[C_HEAD_DIM]
    rope = ints[C_S_ROPE]
    for t in range(tokens):
        _rope_tables(vecs, ints[C_INV_GLOBAL], ints[C_INV_LOCAL], d // 2, positions[t], sc, rope + 2 * d * t)
    eps = net.floats[F_EPS]
    post = ints[C_POST_NORMS] != 0
    for layer in range(layers.shape[0]):
        li = layer * _LINEARS
        rope_at = rope + (d if layers[layer, N_SLIDING] else 0)
        for half in range(2):  # the attention half (phases 0-6), then the feed-forward half (7-11)
            ffn = half == 1
            ph = layer * PHASES + 7 * half
            first = li + (_GATE if ffn else _Q)  # the linears that read the normed residual
            last = li + (_DOWN if ffn else _O)  # the one that writes the residual
            for t in range(tokens):
                _rms(x[t], 0, hidden, vecs, layers[layer, N_FFN if ffn else N_ATTN], eps, normed[t], 0)
            _v_phase(net, worker, ph, first, last, normed, 0, sc, tokens)
            if ffn:
                _glu_phase(net, worker, ph + 1, first, sc, tokens)
            else:
                _u_phase(net, worker, ph + 1, first, last, x, False, sc, tokens)
                _kv_phase(net, worker, ph + 2, layer, positions, caches, sc, rope_at, tokens)
                _attention_phase(net, worker, ph + 3, layer, positions, caches, sc, rope_at, tokens)
            out = ph + (2 if ffn else 4)
            _v_phase(net, worker, out, last, last + 1, work, ints[C_W_F if ffn else C_W_ATT], sc, tokens)
            _u_phase(net, worker, out + 1, last, last + 1, x, not post, sc, tokens)
            if post:
                _post_norm_phase(net, worker, out + 2, layers[layer, N_POST_FFN if ffn else N_POST_ATTN], x, tokens)


@njit(parallel=True, **_OPTS)
def decode_threads(net, x, positions, caches):
    """Every worker's walk in one parallel region. The worker's number goes in as int64, the type a one-worker step
    calls _blocks with, so both use one compiled _blocks (prange's own index type would compile it a second time)."""
    for w in prange(net.scratch.shape[0]):
        _blocks(net, np.int64(w), x, positions, caches)


def _one_worker(net, x, positions, caches) -> None:
    """A one-worker step: the walk itself, with no parallel region."""
    _blocks(net, 0, x, positions, caches)


# --- building the flat arrays from a model -------------------------------------------------------------------------
def _aligned(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Zeros whose first element sits on a 64-byte boundary (a cache line, one 512-bit vector)."""
    count = int(np.prod(shape))
    size = np.dtype(dtype).itemsize
    raw = np.zeros(count * size + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    return raw[start:start + count * size].view(dtype).reshape(shape)


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


class FusedBlocks:
    """The decode step of a model on the numba backend: `self(x, positions, caches)` runs every block for B tokens,
    token t at positions[t] of the sequence whose cache is caches[t].

    The backend's paths carry the signs repacked for the STAGES kernels; `workers` is the number of threads that
    share each step (1: no parallel region at all). `max_tokens`: the most tokens a call should take; beyond one per
    sequence they are a prompt's (several tokens of one cache), which a threaded call spreads over the cores better
    than the op-by-op prefill up to PROMPT_TOKENS."""

    def __init__(self, model, workers: int) -> None:
        cfg = model.config
        self.workers = workers
        self.max_tokens = PROMPT_TOKENS if workers > 1 else 1
        table_word = TABLE_WORD  # table floats per 32 inputs
        vecs: list[np.ndarray] = []
        size = 0

        def put(values: np.ndarray | None) -> int:
            nonlocal size
            if values is None:
                return -1
            vecs.append(np.ascontiguousarray(values, np.float32).reshape(-1))
            size += vecs[-1].size
            return size - vecs[-1].size

        paths, lins, layers = [], [], []
        self._keep = []  # the arrays whose addresses the paths table holds
        mid_size = slot = max_wn = 0
        d = cfg.head_dim
        w_q = 0
        w_k = w_q + _round16(cfg.n_heads * d)
        w_v = w_k + _round16(cfg.n_kv_heads * d)
        w_att = w_v + _round16(cfg.n_kv_heads * d)
        w_o = w_att + _round16(cfg.n_heads * d)
        w_f = w_o + _round16(cfg.hidden)
        w_mid = w_f + _round16(cfg.ffn)
        for blk in model.blocks:
            norms = blk.norms
            layers.append([put(norms.get(K.ATTN_NORM)), put(norms.get(K.FFN_NORM)), put(norms.get(K.ATTN_Q_NORM)),
                           put(norms.get(K.ATTN_K_NORM)), put(norms.get(K.ATTN_POST_NORM)),
                           put(norms.get(K.FFN_POST_NORM)), int(blk.sliding)])
            mid = w_mid
            for name in K.LINEARS:
                lin = blk.linears[name]
                out = {K.ATTN_Q: w_q, K.ATTN_K: w_k, K.ATTN_V: w_v}.get(name, w_o)
                first, tab = len(paths), 0
                for p in lin.paths:
                    v, u = p.v_tiles, p.u_tiles
                    self._keep += [v, u]
                    r = p.s_mid.size
                    wn, wr = (lin.n + 31) // 32, (r + 31) // 32
                    paths.append([v.ctypes.data, u.ctypes.data, lin.n, r, lin.m, wn, wr, (r + TILE - 1) // TILE,
                                  (lin.m + TILE - 1) // TILE, put(p.s_in), put(p.s_mid), put(p.s_out), mid, tab])
                    mid += _round16(32 * wr)
                    tab += table_word * wr
                    slot = max(slot, table_word * wn)
                    max_wn = max(max_wn, wn)
                slot = max(slot, tab)
                lins.append([first, len(lin.paths), put(lin.bias), out, tab])
            mid_size = max(mid_size, mid)
        inv_global, inv_local = put(model._inv_freq[False]), put(model._inv_freq[True])
        self.paths = np.array(paths, np.int64).reshape(-1, 14)
        self.lins = np.array(lins, np.int64)
        self.layers = np.array(layers, np.int64)
        self.vecs = np.concatenate(vecs) if vecs else np.zeros(1, np.float32)
        self.floats = np.array([cfg.norm_eps, cfg.attention_scale, cfg.attn_softcap], np.float32)
        self.counters = _aligned((8 * (workers + 1) * PHASES * len(model.blocks),), np.int64)
        self._hidden, self._mid_size = cfg.hidden, mid_size
        # a worker's scratch regions (offset key, floats), then the RoPE tables of every token, then the scores
        self._regions = ((C_S_XS, 32 * max_wn), (C_S_SUMS, TILE * CHUNK), (C_S_ACC, 2 * TILE * CHUNK), (C_S_Q, d),
                         (C_S_TAB, 2 * slot))
        self._settings = {C_HIDDEN: cfg.hidden, C_HEADS: cfg.n_heads, C_KV: cfg.n_kv_heads, C_HEAD_DIM: d,
                          C_FFN: cfg.ffn, C_GELU: int(cfg.activation == "gelu_tanh"), C_QK_NORM: int(cfg.qk_norm),
                          C_POST_NORMS: int(cfg.post_norms), C_WINDOW: cfg.sliding_window, C_INV_GLOBAL: inv_global,
                          C_INV_LOCAL: inv_local, C_W_Q: w_q, C_W_K: w_k, C_W_V: w_v, C_W_ATT: w_att, C_W_O: w_o,
                          C_W_F: w_f, C_SLOT: slot}
        self._tokens = self._ctx = 0
        self._kernel = decode_threads if workers > 1 else _one_worker

    def _fit(self, tokens: int, ctx: int) -> None:
        """Size the work, the normed inputs and the scratch (whose offsets go into ints) for `tokens` tokens per step
        and attention over `ctx` positions; they only grow."""
        if tokens <= self._tokens and ctx <= self._ctx:
            return
        self._tokens, self._ctx = max(tokens, self._tokens), max(ctx, self._ctx)
        ints, at = dict(self._settings), 0
        for key, n in self._regions:
            ints[key], at = at, at + _round16(n)
        ints[C_S_ROPE], at = at, at + _round16(2 * self._settings[C_HEAD_DIM] * self._tokens)  # token t at + 2d·t
        ints[C_S_P] = at  # the attention's scores
        self.ints = np.array([ints[i] for i in range(len(ints))], np.int64)
        self.scratch = _aligned((self.workers, _round16(at + self._ctx)), np.float32)
        self.work = _aligned((self._tokens, self._mid_size), np.float32)
        self.normed = _aligned((self.workers, self._tokens, _round16(self._hidden)), np.float32)

    def __call__(self, x: np.ndarray, positions: np.ndarray, caches: list) -> np.ndarray:
        """x (B, hidden) float32, the embedded tokens, token t at position positions[t] of the sequence whose cache is
        caches[t] → the last block's outputs (B, hidden); each token's keys and values go into its cache. Tokens that
        share a cache (a prompt) see each other's keys causally: every key of the step is stored before any token
        attends."""
        out = np.array(x, np.float32).reshape(len(caches), -1)
        self._fit(len(caches), max(c.k.shape[2] for c in caches))
        self.counters.fill(0)
        at = np.array([(c.k.ctypes.data, c.v.ctypes.data, c.k.shape[2]) for c in caches], np.int64)
        net = Net(self.paths, self.lins, self.layers, self.ints, self.floats, self.vecs, self.work, self.normed,
                  self.scratch, self.counters)
        self._kernel(net, out, np.asarray(positions, np.int64).reshape(-1), at)
        return out
