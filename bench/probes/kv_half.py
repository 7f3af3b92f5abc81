"""Probe: what half the KV cache's bytes would buy attention on this CPU (the runtime keeps float32 keys and values).

The fused walk's attention loops (scores, softmax, weighted sum of values) for one token over 30 layers x 9 query heads
(3 kv heads, head 64: SmolLM2-135M's shapes) at n positions, each layer's keys and values distinct, as a token's
decoding step reads them. Both versions are the same LLVM IR; the half one stores keys and values as float16 and
widens each 16-lane load (`fpext`, vcvtph2ps on AVX-512) before its multiply-adds, so the difference is the bytes.

    python bench/probes/kv_half.py [--positions 128 1024 2000] [--rounds 2]

Prints the best time per version and position and the half version's error relative to float32, and appends one JSON
line to bench/results/kv-half.jsonl with the commit, the machine and the load average.
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

from bench.speed import commit, machine  # noqa: E402
from runtime.backends.numba_decode import exp32  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD = 30, 9, 3, 64


def make(half: bool):
    """The attention of one token over every layer's cache: float32 keys and values, or float16 ones (half)."""
    @intrinsic
    def scores(typingctx, q, keys, n, p):
        def codegen(context, builder, sig, args):
            ty = sig.args
            intp = context.get_value_type(types.intp)
            vf = ir.VectorType(ir.FloatType(), 16)
            vh = ir.VectorType(ir.HalfType(), 16)
            qa, ka, pa = (context.make_array(ty[k])(context, builder, args[k]) for k in (0, 1, 3))
            kbase = builder.bitcast(ka.data, (vh if half else vf).as_pointer())
            qs = [builder.load(builder.bitcast(builder.gep(qa.data, [ir.Constant(intp, 16 * c)]), vf.as_pointer()),
                               align=4) for c in range(4)]
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, vf]), "llvm.fma.v16f32")
            red = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), vf]),
                                                 "llvm.vector.reduce.fadd.v16f32")
            with cgutils.for_range(builder, args[2]) as loop:
                acc = ir.Constant(vf, [0.0] * 16)
                for c in range(4):
                    at = builder.add(builder.mul(loop.index, ir.Constant(intp, 4)), ir.Constant(intp, c))
                    v = builder.load(builder.gep(kbase, [at]), align=2)
                    if half:
                        v = builder.fpext(v, vf)
                    acc = builder.call(fma, [qs[c], v, acc])
                s = builder.call(red, [ir.Constant(ir.FloatType(), 0.0), acc])
                builder.store(s, builder.gep(pa.data, [loop.index]))
            return context.get_dummy_value()
        return types.void(q, keys, n, p), codegen

    @intrinsic
    def wsum(typingctx, p, values, n, out):
        def codegen(context, builder, sig, args):
            ty = sig.args
            intp = context.get_value_type(types.intp)
            vf = ir.VectorType(ir.FloatType(), 16)
            vh = ir.VectorType(ir.HalfType(), 16)
            pa, va, oa = (context.make_array(ty[k])(context, builder, args[k]) for k in (0, 1, 3))
            vbase = builder.bitcast(va.data, (vh if half else vf).as_pointer())
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, vf]), "llvm.fma.v16f32")
            undef, zeros = ir.Constant(vf, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 16)) for _ in range(8)]
            pairs = builder.udiv(args[2], ir.Constant(intp, 2))
            with cgutils.for_range(builder, pairs) as loop:
                for u in range(2):
                    j = builder.add(builder.mul(loop.index, ir.Constant(intp, 2)), ir.Constant(intp, u))
                    first = ir.Constant(ir.IntType(32), 0)
                    one = builder.insert_element(undef, builder.load(builder.gep(pa.data, [j])), first)
                    w = builder.shuffle_vector(one, undef, zeros)
                    for c in range(4):
                        at = builder.add(builder.mul(j, ir.Constant(intp, 4)), ir.Constant(intp, c))
                        v = builder.load(builder.gep(vbase, [at]), align=2)
                        if half:
                            v = builder.fpext(v, vf)
                        a = accs[4 * u + c]
                        builder.store(builder.call(fma, [w, v, builder.load(a)]), a)
            for c in range(4):
                total = builder.fadd(builder.load(accs[c]), builder.load(accs[4 + c]))
                dst = builder.bitcast(builder.gep(oa.data, [ir.Constant(intp, 16 * c)]), vf.as_pointer())
                builder.store(total, dst, align=4)
            return context.get_dummy_value()
        return types.void(p, values, n, out), codegen

    @njit(fastmath=True, nogil=True)
    def attend(q, kc, vc, n, p, out):
        for L in range(kc.shape[0]):
            for h in range(HEADS):
                g = h // (HEADS // KV_HEADS)
                scores(q[h], kc[L, g], n, p)
                best = -np.inf
                for j in range(n):
                    best = max(best, p[j] * np.float32(0.125))
                total = np.float32(0.0)
                for j in range(n):
                    e = exp32(p[j] * np.float32(0.125) - best)
                    p[j] = e
                    total += e
                wsum(p, vc[L, g], n, out[h])
    return attend

ATTEND = {"float32": make(False), "float16": make(True)}


def best_ms(f, *args, rounds: int = 15) -> float:
    f(*args)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", nargs="+", type=int, default=[128, 1024, 2000])
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two versions; the best is kept")
    a = ap.parse_args()
    if any(n < 2 or n % 2 for n in a.positions):
        raise SystemExit("error: --positions must be even (the weighted sum takes two positions per pass)")
    load = os.getloadavg()
    rng = np.random.default_rng(0)
    rows = {}
    for n in a.positions:
        keys = rng.standard_normal((LAYERS, KV_HEADS, n, HEAD)).astype(np.float32)
        values = rng.standard_normal((LAYERS, KV_HEADS, n, HEAD)).astype(np.float32)
        caches = {"float32": (keys, values),
                  "float16": (keys.astype(np.float16).view(np.uint16), values.astype(np.float16).view(np.uint16))}
        q = rng.standard_normal((HEADS, HEAD)).astype(np.float32)
        p = np.zeros(n, np.float32)
        outs = {kind: np.zeros((HEADS, HEAD), np.float32) for kind in ATTEND}
        best = {kind: np.inf for kind in ATTEND}
        for _ in range(a.rounds):
            for kind, attend in ATTEND.items():
                best[kind] = min(best[kind], best_ms(attend, q, *caches[kind], n, p, outs[kind]))
        error = float(np.abs(outs["float16"] - outs["float32"]).max() / np.abs(outs["float32"]).max())
        rows[str(n)] = dict(float32_ms=best["float32"], float16_ms=best["float16"],
                            ratio=best["float16"] / best["float32"], relative_error=error)
        print(f"n={n}: float32 {best['float32']:.3f} ms, float16 {best['float16']:.3f} ms, "
              f"ratio {best['float16'] / best['float32']:.3f}; error {error:.1e}", flush=True)
    record = dict(commit=commit(), machine=machine(), load_average_start=load, load_average_end=os.getloadavg(),
                  positions=rows)
    with open(ROOT / "bench" / "results" / "kv-half.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
