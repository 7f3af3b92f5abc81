"""One binary linear, one token, one thread: the fixed-point kernel (runtime/backends/numba_fixed.py) against LUT-8's
one-token kernel (numba_kernels.py), on random signs of SmolLM2-135M's shapes at 1 bit per weight.

    python bench/probes/fixed_linear.py [--rounds 5] [--calls 200]

Best of --rounds of --calls calls each, in µs per call; the fixed kernel's table building alone (one stage's input)
beside it. Appends one JSON line to bench/results/fixed-linear.jsonl. Needs AVX2; run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.speed import commit, machine  # noqa: E402
from runtime.backends import numba_fixed as fixed, numba_kernels as nk  # noqa: E402

SHAPES = ((1536, 576, 419), (576, 1536, 419), (576, 576, 288))  # m, n, rank: gate/up, down, q/o at ~1 bpw


def best_us(fn, rounds: int, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    record = {"commit": commit(), "machine": machine(), "load_average_before": os.getloadavg(), "shapes": []}
    for m, n, r in SHAPES:
        v_bytes = rng.integers(0, 256, (r, 4 * ((n + 31) // 32)), dtype=np.uint8)
        u_bytes = rng.integers(0, 256, (m, 4 * ((r + 31) // 32)), dtype=np.uint8)
        x = rng.standard_normal(n).astype(np.float32)
        s_in, s_mid, s_out = (rng.uniform(0.5, 1.5, k).astype(np.float32) for k in (n, r, m))
        y = np.empty(m, np.float32)
        v_tiles, u_tiles = fixed.repack(v_bytes), fixed.repack(u_bytes)
        v, tab, sums = (np.zeros(k, np.float32) for k in fixed.scratch_sizes(n, r, m))
        width = max(v_bytes.shape[1], u_bytes.shape[1], (max(r, m) + 7) // 8)
        xs8, tab8, h8 = np.zeros(8 * width, np.float32), np.zeros(256 * width, np.float32), np.zeros(8 * width,
                                                                                                       np.float32)
        v[:n] = x * s_in
        times = {
            "fixed": best_us(lambda: fixed.path_token_serial(x, s_in, v_tiles, s_mid, u_tiles, s_out, v, tab, sums, y,
                                                             False), a.rounds, a.calls),
            "lut8": best_us(lambda: nk.SERIAL.binary_path_decode(x, s_in, v_bytes, s_mid, u_bytes, s_out, xs8, tab8,
                                                                 h8, y, False), a.rounds, a.calls),
            "fixed_tables_one_stage": best_us(lambda: fixed.build_tables(tab, 0, v, 0, 2 * v_bytes.shape[1]), a.rounds,
                                              a.calls)}
        record["shapes"].append({"m": m, "n": n, "rank": r, "us": times})
        print(f"{m}x{n} rank {r}: " + ", ".join(f"{k} {t:.1f} us" for k, t in times.items()), flush=True)
    record["load_average_after"] = os.getloadavg()
    with open(ROOT / "bench" / "results" / "fixed-linear.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
