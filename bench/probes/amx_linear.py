"""Would AMX tiles make batched binary linears cheaper per token? A probe of a design the runtime does not have.

On CPUs with AMX-INT8 (Intel Xeon since Sapphire Rapids) one `tdpbssd` multiplies a 16×64 int8 tile by a 64×16 int8
tile into 16×16 int32 sums. For a stage of a binary linear, out[t, i] = Σ_k sign(i, k)·x[t, k]:
- each token's input is rounded per vector to q = rint(x·16319 / absmax) (15 bits) and split into two int8 columns,
  q = 128·hi + lo (lo in [−64, 63]); eight tokens fill the 16 columns of one B tile (his, then los);
- 16 rows of signs (bit 1 = −1) become the A tile's bytes by `vpmovm2b` (bit set → −1, clear → 0), 64 columns per
  64-bit mask: with b in {−1, 0}, sign = 1 + 2b, so Σ sign·q = Σ q + 2·(128·Σ b·hi + Σ b·lo), exact in int32;
- every 64 rows (four tiles) are expanded once into a scratch of 1 KB A tiles, then multiplied by every group of
  eight tokens.
The sums are exact integers, so a single-token kernel on the same rounded inputs (integer LUT-16 tables) would give
the same bits: a sequence's text would not depend on what shares its batch. This probe measures the speed against
LUT-16 token by token, the error against float64, and the parts of the AMX stage alone (the expansion of every row,
the rounding of eight tokens, the tile loads and products of one group, and as many products without their loads).

    python bench/probes/amx_linear.py [--rows 1536] [--cols 576]

Linux only (the process asks the kernel for the AMX tile state with arch_prctl). One JSON line per run in
bench/results/amx-linear-probe.jsonl with the commit and load average.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.probes.int8_linear import best_ms  # noqa: E402
from bench.speed import commit  # noqa: E402
from nqfmt import pack_signs  # noqa: E402
from runtime.backends import numba_lut16 as lut16  # noqa: E402
from runtime.backends.numba_lut16 import TILE, _data, address  # noqa: E402

QMAX = 16319  # |q| ≤ 16319: hi = floor((q + 64) / 128) stays within ±127
GROUP = 8  # tokens per B tile: two int8 columns each
ROW_TILES = 4  # row tiles multiplied together, each into its own accumulator
# A load waits for every product that reads the tile it overwrites (tile registers are not renamed), so A and B
# tiles alternate between two registers each; each A tile is 1 KB contiguous.
A_TILES, B_TILES, C_TILES = (0, 1), (2, 3), (4, 5, 6, 7)
ROUNDS = 30  # timings per figure, the best kept
_I8, _I64 = ir.IntType(8), ir.IntType(64)
_P8 = _I8.as_pointer()


def amx_permitted() -> bool:
    """Ask Linux for the AMX tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0


def tile_config() -> np.ndarray:
    """The 64-byte palette-1 configuration: every tile used is 16 rows of 64 bytes."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    for tile in range(8):
        cfg[16 + 2 * tile] = 64
        cfg[48 + tile] = 16
    return cfg


def _call(builder, name, args, ret=ir.VoidType()):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _byte_ptr(context, builder, ty, arr, offset):
    return builder.gep(builder.bitcast(_data(context, builder, ty, arr), _P8), [offset])


@intrinsic
def load_config(typingctx, cfg):
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.ldtilecfg", [_byte_ptr(context, builder, sig.args[0], args[0], _I64(0))])
        return context.get_dummy_value()
    return types.void(cfg), codegen


@intrinsic
def release(typingctx):
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilerelease", [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def expand_block(typingctx, words, row0, buf):
    """The signs of rows row0 .. row0 + 64 as A tiles: buf[((r·steps + c)·16 + l)·64 + j] = −1 if bit j of
    words[row0 + 16r + l, c] is set, else 0 (words: uint64 rows × steps, 64 columns each): `vpmovm2b` per mask, each
    (row tile, K step) tile 1 KB contiguous."""
    def codegen(context, builder, sig, args):
        ty = sig.args
        arr = context.make_array(ty[0])(context, builder, args[0])
        steps = builder.extract_value(arr.shape, 1)
        base = builder.bitcast(arr.data, _I64.as_pointer())
        out = builder.bitcast(_data(context, builder, ty[2], args[2]), _P8)
        r0 = context.cast(builder, args[1], ty[1], types.intp)
        bits, lanes = ir.VectorType(ir.IntType(1), 64), ir.VectorType(_I8, 64)
        k = steps.type
        with cgutils.for_range(builder, ir.Constant(k, 16 * ROW_TILES)) as rows:
            row = rows.index
            src = builder.mul(builder.add(r0, row), steps)
            r, l = builder.udiv(row, ir.Constant(k, 16)), builder.urem(row, ir.Constant(k, 16))
            first = builder.mul(r, steps)
            with cgutils.for_range(builder, steps) as cols:
                mask = builder.load(builder.gep(base, [builder.add(src, cols.index)]))
                v = builder.sext(builder.bitcast(mask, bits), lanes)
                tile = builder.add(first, cols.index)
                at = builder.mul(builder.add(builder.mul(tile, ir.Constant(k, 16)), l), ir.Constant(k, 64))
                builder.store(v, builder.bitcast(builder.gep(out, [at]), lanes.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(words, row0, buf), codegen


def _tile_op(kind: str):
    """For ROW_TILES row tiles: 'zero' the accumulators; 'steps': K steps s and s + 1 (per step one B load, then per
    row tile its A load and a tdpbssd into its accumulator); 'store' the accumulators (1 KB each, consecutive).
    Arguments: buf (A tiles), s·1024 (the step's tile in row tile 0), steps·1024 (from one row tile to the next),
    bpack, its offset of step s, of step s + 1, cbuf."""
    @intrinsic
    def op(typingctx, a, a_off, a_next, b, b_off, b_off2, c):
        def codegen(context, builder, sig, args):
            ty = sig.args
            if kind == "zero":
                for t in C_TILES:
                    _call(builder, "llvm.x86.tilezero", [ir.Constant(_I8, t)])
            elif kind == "store":
                for r, t in enumerate(C_TILES):
                    p = _byte_ptr(context, builder, ty[6], args[6], _I64(r * 1024))
                    _call(builder, "llvm.x86.tilestored64", [ir.Constant(_I8, t), p, _I64(64)])
            else:
                for h in range(2):
                    bt = ir.Constant(_I8, B_TILES[h])
                    pb = _byte_ptr(context, builder, ty[3], args[3], args[4 + h])
                    _call(builder, "llvm.x86.tileloadd64", [bt, pb, _I64(64)])
                    for r, ct in enumerate(C_TILES):
                        at = ir.Constant(_I8, A_TILES[r % 2])
                        off = builder.add(builder.add(args[1], _I64(1024 * h)), builder.mul(args[2], _I64(r)))
                        pa = _byte_ptr(context, builder, ty[0], args[0], off)
                        _call(builder, "llvm.x86.tileloadd64", [at, pa, _I64(64)])
                        _call(builder, "llvm.x86.tdpbssd", [ir.Constant(_I8, ct), at, bt])
            return context.get_dummy_value()
        return types.void(a, a_off, a_next, b, b_off, b_off2, c), codegen
    return op


_ZERO, _STEPS, _STORE = (_tile_op(k) for k in ("zero", "steps", "store"))


@intrinsic
def _products(typingctx):
    """Four tdpbssd on the tiles as they are: the products of a K step without its loads."""
    def codegen(context, builder, sig, args):
        for r, ct in enumerate(C_TILES):
            _call(builder, "llvm.x86.tdpbssd", [ir.Constant(_I8, ct), ir.Constant(_I8, A_TILES[r % 2]),
                                                ir.Constant(_I8, B_TILES[0])])
        return context.get_dummy_value()
    return types.void(), codegen


@njit(fastmath=True, nogil=True)
def prepare(x, hi, lo, bpack, sumq, scale):
    """x (T, n) → the B tiles in bpack: K step s of token group g at (s·groups + g)·1024 bytes, its row k4 holding
    inputs 64s + 4k4 .. 64s + 4k4 + 3 of its 16 columns (column t: token t's hi, 8 + t: its lo); sumq[t] = Σ q;
    scale[t] = absmax / QMAX. hi, lo: int8 scratch (T, n64), zero past n."""
    t_all, n = x.shape
    steps = hi.shape[1] // 64
    groups = (t_all + GROUP - 1) // GROUP
    for t in range(t_all):
        xt, ht, lt = x[t], hi[t], lo[t]
        amax = np.float32(0.0)
        for k in range(n):
            amax = max(amax, abs(xt[k]))
        inv = np.float32(QMAX) / amax if amax > 0 else np.float32(0.0)
        scale[t] = amax / np.float32(QMAX) if amax > 0 else np.float32(0.0)
        total = 0
        for k in range(n):
            q = np.int32(np.rint(xt[k] * inv))
            h = (q + 64) >> 7
            ht[k] = h
            lt[k] = q - 128 * h
            total += q
        sumq[t] = total
    hi32, lo32, b32 = hi.view(np.int32), lo.view(np.int32), bpack.view(np.int32)
    for t in range(t_all):
        g, col = t // GROUP, t % GROUP
        for s in range(steps):
            at = (s * groups + g) * 256 + col
            for k4 in range(16):
                b32[at + 16 * k4] = hi32[t, 16 * s + k4]
                b32[at + 16 * k4 + GROUP] = lo32[t, 16 * s + k4]


@njit(fastmath=True, nogil=True)
def amx_stage(cfg, words, x, out_t, buf, hi, lo, bpack, cbuf, sumq, scale):
    """out_t (m64, T) = signs · x for T tokens: per 64 rows, their signs expanded once, then each group of eight
    tokens multiplied by them."""
    t_all, n = x.shape
    m64 = out_t.shape[0]
    steps = words.shape[1]
    groups = (t_all + GROUP - 1) // GROUP
    prepare(x, hi, lo, bpack, sumq, scale)
    load_config(cfg)
    for r0 in range(0, m64, 16 * ROW_TILES):
        expand_block(words, r0, buf)
        for g in range(groups):
            _ZERO(buf, 0, 0, bpack, 0, 0, cbuf)
            for s in range(0, steps, 2):  # steps is even (inputs padded to 128)
                _STEPS(buf, 1024 * s, 1024 * steps, bpack, (s * groups + g) * 1024, ((s + 1) * groups + g) * 1024,
                       cbuf)
            _STORE(buf, 0, 0, bpack, 0, 0, cbuf)
            t0 = g * GROUP
            k = min(GROUP, t_all - t0)
            sq, sc = sumq[t0:t0 + k], scale[t0:t0 + k]
            for l in range(16 * ROW_TILES):  # accumulator r's row l' is cbuf row 16r + l'
                c = 16 * l
                h, w, o = cbuf[c:c + k], cbuf[c + GROUP:c + GROUP + k], out_t[r0 + l, t0:t0 + k]
                for j in range(k):
                    o[j] = np.float32(sq[j] + 256 * h[j] + 2 * w[j]) * sc[j]
    release()


@njit(nogil=True)
def expand_all(words, buf, m64):
    """The expansion of amx_stage alone."""
    for r0 in range(0, m64, 16 * ROW_TILES):
        expand_block(words, r0, buf)


@njit(nogil=True)
def tiles_alone(cfg, buf, bpack, cbuf, steps, m64):
    """The tile loads, products and stores of amx_stage for one group of eight tokens, alone."""
    load_config(cfg)
    for r0 in range(0, m64, 16 * ROW_TILES):
        _ZERO(buf, 0, 0, bpack, 0, 0, cbuf)
        for s in range(0, steps, 2):
            _STEPS(buf, 1024 * s, 1024 * steps, bpack, s * 1024, (s + 1) * 1024, cbuf)
        _STORE(buf, 0, 0, bpack, 0, 0, cbuf)
    release()


@njit(nogil=True)
def products_alone(cfg, count):
    """`count` × 4 products with no loads between them."""
    load_config(cfg)
    for _ in range(count):
        _products()
    release()


@njit(fastmath=True)
def lut16_stages(tiles, x, xs, tab, sums, out):
    """The runtime's exact LUT-16 stage, token after token."""
    at = address(tiles)
    m = out.shape[1]
    for k in range(x.shape[0]):
        xs[:x.shape[1]] = x[k]
        lut16.stage(xs, tiles.shape[1], at, 0, tiles.shape[0], tab, sums)
        out[k] = sums[:m]


def speed(m: int, n: int, token_counts: list[int]) -> dict:
    rng = np.random.default_rng(0)
    signs = np.where(rng.random((m, n)) < 0.5, -1.0, 1.0)
    n64, m16 = (n + 127) // 128 * 128, (m + 16 * ROW_TILES - 1) // (16 * ROW_TILES) * 16 * ROW_TILES
    padded = np.ones((m16, n64))
    padded[:m, :n] = signs
    words = np.ascontiguousarray(pack_signs(padded)).view(np.uint64)  # bit j of word c: column 64c + j
    tiles = lut16.repack(pack_signs(signs))
    cfg = tile_config()
    buf = np.zeros(16 * ROW_TILES * n64, np.int8)
    steps = n64 // 64
    rows = {}
    for t in token_counts:
        x = rng.standard_normal((t, n)).astype(np.float32)
        x[:, rng.integers(0, n, 4)] *= 20  # a few outlier channels, as LLM activations have
        groups = (t + GROUP - 1) // GROUP
        stage = amx_stage
        bpack = np.zeros(groups * steps * 1024, np.int8)
        cbuf = np.zeros(ROW_TILES * 256, np.int32)
        hi, lo = np.zeros((t, n64), np.int8), np.zeros((t, n64), np.int8)
        sumq, scale = np.zeros(t, np.int32), np.zeros(t, np.float32)
        out_t = np.empty((m16, t), np.float32)
        stage(cfg, words, x, out_t, buf, hi, lo, bpack, cbuf, sumq, scale)
        out = out_t[:m].T
        want = x.astype(np.float64) @ signs.T
        q = np.rint(x.astype(np.float64) / scale[:, None].astype(np.float64))
        exact_int = (q @ signs.T) * scale[:, None]  # the same rounding, summed in float64: AMX must equal it
        lut_out = np.empty((t, m), np.float32)
        xs = np.zeros(32 * tiles.shape[1], np.float32)
        tab, sums = np.zeros(lut16.TABLE_WORD * tiles.shape[1], np.float32), np.zeros(TILE * tiles.shape[0], np.float32)
        lut16_stages(tiles, x, xs, tab, sums, lut_out)
        amx = lambda: stage(cfg, words, x, out_t, buf, hi, lo, bpack, cbuf, sumq, scale)  # noqa: E731
        rows[t] = dict(amx_ms=best_ms(amx, ROUNDS),
                       lut16_ms=best_ms(lambda: lut16_stages(tiles, x, xs, tab, sums, lut_out), ROUNDS),
                       amx_error=float(np.abs(out - want).max() / np.abs(want).max()),
                       amx_vs_rounded=float(np.abs(out - exact_int).max() / np.abs(want).max()),
                       lut16_error=float(np.abs(lut_out - want).max() / np.abs(want).max()))
        rows[t]["lut16_over_amx"] = rows[t]["lut16_ms"] / rows[t]["amx_ms"]
        print(t, {k: round(v, 7) for k, v in rows[t].items()}, flush=True)
    x = rng.standard_normal((GROUP, n)).astype(np.float32)
    bpack = np.zeros(steps * 1024, np.int8)
    hi, lo = np.zeros((GROUP, n64), np.int8), np.zeros((GROUP, n64), np.int8)
    sumq, scale = np.zeros(GROUP, np.int32), np.zeros(GROUP, np.float32)
    cbuf = np.zeros(ROW_TILES * 256, np.int32)
    parts = dict(expansion_ms=best_ms(lambda: expand_all(words, buf, m16), ROUNDS),
                 rounding_8_tokens_ms=best_ms(lambda: prepare(x, hi, lo, bpack, sumq, scale), ROUNDS),
                 tiles_8_tokens_ms=best_ms(lambda: tiles_alone(cfg, buf, bpack, cbuf, steps, m16), ROUNDS),
                 products_8_tokens_without_loads_ms=best_ms(lambda: products_alone(cfg, m16 // 64 * steps), ROUNDS))
    print("parts", {k: round(v, 5) for k, v in parts.items()}, flush=True)
    return dict(shape=[m, n], tokens=rows, parts=parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=576)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = ap.parse_args()
    if not amx_permitted():
        raise SystemExit("error: this CPU or kernel gives no AMX tile state (arch_prctl failed)")
    load = os.getloadavg()
    row = speed(args.rows, args.cols, args.tokens)
    row = dict(commit=commit(), load_average_start=load, load_average_end=os.getloadavg(), **row)
    with open(ROOT / "bench" / "results" / "amx-linear-probe.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
