"""Would int8 inputs make the binary linears faster? A probe of the design the runtime did not adopt
(runtime/README.md, "Tried and not adopted").

A stage's input is rounded to int8 per block of 32 (absmax / 127, as the int8 head); the LUT-16 tiles' nibbles become
bytes 0/1 by one `vpermd` through a 16-entry table of their bits, and `vpdpbusd` multiplies 4 of them by 4 of the
token's bytes in each of 16 rows (a row's value is Σx − 2·Σ_{bit set} x per block). Several tokens share each
expansion (four at a time). Two questions:

    python bench/probes/int8_linear.py speed            # one 1536×576 sign matrix, 1/4/8/64 tokens, against LUT-16
    python bench/probes/int8_linear.py accuracy FILE    # perplexity, numpy float64, stage inputs rounded or not

`accuracy` runs the numpy reference backend with and without the rounding on --windows windows of --ctx tokens of the
test text. Each appends a line to bench/results/int8-linear-probe.jsonl with the commit and load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.speed import commit  # noqa: E402
from nqfmt import pack_signs, unpack_signs  # noqa: E402
from runtime.backends import numba_lut16 as lut16  # noqa: E402
from runtime.backends.numba_lut16 import TILE, _data, address  # noqa: E402
from runtime.backends.numba_int8 import _VF, _VI, _splat, _vnni  # noqa: E402

EXPAND = np.array([sum(((e >> j) & 1) << (8 * j) for j in range(4)) for e in range(16)], np.int32)

def _codegen(tokens):
    """Per word of 16 rows: 8 nibbles → bytes (vpermd through EXPAND) → vpdpbusd with each token's 4 bytes; per
    block of 32, the row sums Σx − 2·Σ_{bit set} x (sign bit set = −1) times the block's step."""

    def codegen(context, builder, signature, args):
        ty = signature.args
        intp = context.get_value_type(types.intp)
        dot, _ = _vnni(builder)
        permd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI, [_VI, _VI]),
                                               "llvm.x86.avx512.permvar.si.512")
        expand = builder.load(builder.bitcast(_data(context, builder, ty[0], args[0]), _VI.as_pointer()), align=4)
        codes = builder.inttoptr(context.cast(builder, args[1], ty[1], types.int64), _VI.as_pointer())
        nw = context.cast(builder, args[2], ty[2], types.intp)
        xq_p, xs_p, sq_p, sums_p = (_data(context, builder, ty[k], args[k]) for k in (3, 5, 7, 9))
        xi, si, qi, oi = (context.cast(builder, args[k], ty[k], types.intp) for k in (4, 6, 8, 10))
        # token t: xq words at xi + 8·nw·t, xs at si + nw·t, sq at qi + nw·t, sums at oi + 16t
        token_words = builder.mul(nw, ir.Constant(intp, 8))
        xis = [builder.add(xi, builder.mul(token_words, ir.Constant(intp, t))) for t in range(tokens)]
        sis = [builder.add(si, builder.mul(nw, ir.Constant(intp, t))) for t in range(tokens)]
        qis = [builder.add(qi, builder.mul(nw, ir.Constant(intp, t))) for t in range(tokens)]
        zero = ir.Constant(_VI, [0] * TILE)
        two = ir.Constant(_VI, [2] * TILE)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_VF, [0.0] * TILE)) for _ in range(tokens)]
        with cgutils.for_range(builder, nw) as loop:
            w = loop.index
            word = builder.load(builder.gep(codes, [w]), align=4)
            chains = [[zero, zero] for _ in range(tokens)]
            for k in range(8):
                idx = builder.lshr(word, ir.Constant(_VI, [4 * k] * TILE)) if k else word
                bytes_ = builder.call(permd, [expand, idx])
                slot = builder.add(builder.mul(w, ir.Constant(intp, 8)), ir.Constant(intp, k))
                for t in range(tokens):
                    x4 = _splat(builder, builder.load(builder.gep(xq_p, [builder.add(xis[t], slot)])))
                    chains[t][k % 2] = builder.call(dot, [chains[t][k % 2], bytes_, x4])
            for t in range(tokens):
                d = builder.add(chains[t][0], chains[t][1])
                sq = _splat(builder, builder.load(builder.gep(sq_p, [builder.add(qis[t], w)])))
                block = builder.sub(sq, builder.mul(d, two))
                scale = _splat(builder, builder.load(builder.gep(xs_p, [builder.add(sis[t], w)])), _VF)
                term = builder.fmul(builder.sitofp(block, _VF), scale)
                builder.store(builder.fadd(builder.load(accs[t]), term), accs[t])
        for t in range(tokens):
            at = builder.add(oi, ir.Constant(intp, TILE * t))
            builder.store(builder.load(accs[t]), builder.bitcast(builder.gep(sums_p, [at]), _VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


def _sig(expand, addr, nw, xq, xi, xs, si, sq, qi, sums, oi):
    return types.void(expand, addr, nw, xq, xi, xs, si, sq, qi, sums, oi)


@intrinsic
def tile1(typingctx, expand, addr, nw, xq, xi, xs, si, sq, qi, sums, oi):
    """sums[oi:oi+16] = the 16 rows of the sign tile at `addr` (nw words × 16) times one int8 token."""
    return _sig(expand, addr, nw, xq, xi, xs, si, sq, qi, sums, oi), _codegen(1)


@intrinsic
def tile4(typingctx, expand, addr, nw, xq, xi, xs, si, sq, qi, sums, oi):
    """tile1 for four consecutive tokens, each expansion shared by the four."""
    return _sig(expand, addr, nw, xq, xi, xs, si, sq, qi, sums, oi), _codegen(4)


@njit(fastmath=True, nogil=True)
def quantize(x, xq, xs, sq):
    """x (T, 32 nw) → xq int8 (T, 32 nw), xs (T, nw), sq (T, nw) = Σ xq per block."""
    t_all, n = x.shape
    for t in range(t_all):
        for b in range(n // 32):
            amax = np.float32(0.0)
            for p in range(32):
                amax = max(amax, abs(x[t, b * 32 + p]))
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            xs[t, b] = amax / np.float32(127.0)
            total = 0
            for p in range(32):
                q = np.int32(np.rint(x[t, b * 32 + p] * inv))
                xq[t, b * 32 + p] = q
                total += q
            sq[t, b] = total


@njit(fastmath=True, nogil=True)
def stage(tiles, x, out):
    """out (T, rows16) = signs · x for every token."""
    t_all, n = x.shape
    n_tiles, nw = tiles.shape[0], tiles.shape[1]
    xq, xs, sq = np.empty((t_all, n), np.int8), np.empty((t_all, nw), np.float32), np.empty((t_all, nw), np.int32)
    quantize(x, xq, xs, sq)
    xq4, xs1, sq1 = xq.reshape(-1).view(np.int32), xs.reshape(-1), sq.reshape(-1)
    at = address(tiles)
    sums = np.empty(4 * TILE, np.float32)
    grouped = t_all // 4 * 4
    for b in range(n_tiles):
        a = at + b * nw * TILE * 4
        for t0 in range(0, grouped, 4):
            tile4(EXPAND, a, nw, xq4, t0 * 8 * nw, xs1, t0 * nw, sq1, t0 * nw, sums, 0)
            for t in range(4):
                for l in range(TILE):
                    out[t0 + t, b * TILE + l] = sums[t * TILE + l]
        for t in range(grouped, t_all):
            tile1(EXPAND, a, nw, xq4, t * 8 * nw, xs1, t * nw, sq1, t * nw, sums, 0)
            for l in range(TILE):
                out[t, b * TILE + l] = sums[l]


@njit(fastmath=True)
def lut16_stages(tiles, x, xs, tab, sums):
    """The runtime's exact LUT-16 stage, token after token."""
    at = address(tiles)
    for k in range(x.shape[0]):
        xs[:] = x[k]
        lut16.stage(xs, tiles.shape[1], at, 0, tiles.shape[0], tab, sums)


def best_ms(f, rounds: int = 20) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def speed() -> dict:
    rng = np.random.default_rng(0)
    m, n = 1536, 576
    signs = np.where(rng.random((m, n)) < 0.5, -1.0, 1.0)
    tiles = lut16.repack(pack_signs(signs))
    rows = {}
    for t in (1, 4, 8, 64):
        x = rng.standard_normal((t, n)).astype(np.float32)
        out = np.empty((t, m), np.float32)
        stage(tiles, x, out)
        want = x.astype(np.float64) @ signs.T
        xs, tab, sums = np.zeros(n, np.float32), np.zeros(4 * n, np.float32), np.zeros(m + TILE, np.float32)
        lut16_stages(tiles, x, xs, tab, sums)
        rows[t] = dict(int8_ms=best_ms(lambda: stage(tiles, x, out)),
                       lut16_ms=best_ms(lambda: lut16_stages(tiles, x, xs, tab, sums)),
                       relative_error=float(np.abs(out - want).max() / np.abs(want).max()))
        print(t, rows[t], flush=True)
    return dict(shape=[m, n], tokens=rows)


def rounded(x: np.ndarray) -> np.ndarray:
    """x (T, n) with every block of 32 rounded to int8 steps of absmax / 127, in float64."""
    t, n = x.shape
    blocks = np.pad(x, ((0, 0), (0, (-n) % 32))).reshape(t, -1, 32)
    step = np.abs(blocks).max(-1, keepdims=True) / 127.0
    step = np.where(step > 0, step, 1.0)
    return (np.rint(blocks / step) * step).reshape(t, -1)[:, :n]


def accuracy(path: str, windows: int, ctx: int) -> dict:
    import runtime
    from nqdata import default_text
    from runtime.backends import numpy_ref
    from runtime.perplexity import perplexity
    signs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    result = {}
    for mode in ("exact", "int8"):
        def linear(self, w, x, _mode=mode):
            y = np.zeros((x.shape[0], w.m))
            for p in w.paths:
                if id(p) not in signs:
                    signs[id(p)] = (unpack_signs(p.v_signs, w.n, np.float32).T.astype(np.float64),
                                    unpack_signs(p.u_signs, p.rank, np.float32).T.astype(np.float64))
                vt, ut = signs[id(p)]
                a = x * p.scale_in.astype(np.float64)
                h = (rounded(a) if _mode == "int8" else a) @ vt
                if p.scale_mid is not None:
                    h = h * p.scale_mid.astype(np.float64)
                y += ((rounded(h) if _mode == "int8" else h) @ ut) * p.scale_out.astype(np.float64)
            return y if w.bias is None else y + w.bias.astype(np.float64)

        numpy_ref.NumpyBackend.linear = linear
        model = runtime.load(path, backend="numpy")
        with open(default_text("test"), encoding="utf-8") as f:
            ids = model.tokenize(f.read())
        result[mode] = perplexity(model.model, ids, ctx=ctx, windows=windows).ppl
        print(mode, result[mode], flush=True)
    return dict(file=os.path.basename(path), windows=windows, ctx=ctx, ppl=result,
                increase=result["int8"] / result["exact"] - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["speed", "accuracy"])
    ap.add_argument("file", nargs="?")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    load = os.getloadavg()
    row = speed() if args.what == "speed" else accuracy(args.file, args.windows, args.ctx)
    row = dict(what=args.what, commit=commit(), load_average_start=load, load_average_end=os.getloadavg(), **row)
    with open(ROOT / "bench" / "results" / "int8-linear-probe.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
