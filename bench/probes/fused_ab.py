"""Probe: two versions of the fused decode step (runtime/backends/numba_decode.py), steps interleaved in one process.

Both versions are loaded from the given source files as modules of runtime.backends under their own names, so both
are copies: a copy imported under another name ran 11-19% slower than runtime.backends.numba_decode itself with
identical source, in every pairing tried (cause not found), so an A/B of the module against a copy compares unequal
things. Each version builds its own FusedBlocks over one model; the timed steps (the blocks of one decoding step,
without the embedding and the head) alternate A, B / B, A, and each version compiles once before timing (numba's
cache keeps it for the next run). The versions must share the model's kernels (STAGES) and Net layout.

    git show REV:runtime/backends/numba_decode.py > a.py     # and b.py: the version to compare
    python bench/probes/fused_ab.py FILE a.py b.py [--threads 1 2] [--batch 1] [--rounds 4]

Prints the median step per version and thread count, and appends one JSON line to bench/results/fused-ab.jsonl.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import runtime  # noqa: E402
from bench.speed import commit, machine  # noqa: E402


def load_version(path: Path, name: str):
    """The numba_decode source at `path` as the module runtime.backends.<name>."""
    full = f"runtime.backends.{name}"
    spec = importlib.util.spec_from_file_location(full, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


def timed_steps(path: str, versions: list, threads: int, batch: int, rounds: int) -> list[list[float]]:
    """Seconds per step of each version, 64 steps per round, the order alternating."""
    lm = runtime.load(path, backend="numba", threads=threads, n_ctx=512)
    model = lm.model
    fused = [v.FusedBlocks(model, threads) for v in versions]
    caches = [model.new_cache(512) for _ in range(batch)]
    for c in caches:
        model.forward(np.random.default_rng(0).integers(100, 1000, 32), 0, c)
    x = model._embed(np.full(batch, 5))
    for f in fused:  # compile or load, outside the timing
        f(x, np.full(batch, 32), caches)
    times: list[list[float]] = [[] for _ in versions]
    for _ in range(rounds):
        for pos in range(32, 96):
            order = range(len(fused)) if pos % 2 else reversed(range(len(fused)))
            for i in order:
                start = time.perf_counter()
                fused[i](x, np.full(batch, pos), caches)
                times[i].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("version_a", type=Path)
    ap.add_argument("version_b", type=Path)
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    versions = [load_version(args.version_a, "_fused_ab_a"), load_version(args.version_b, "_fused_ab_b")]
    results = []
    for threads in args.threads:
        times = timed_steps(args.file, versions, threads, args.batch, args.rounds)
        a, b = (float(np.median(t)) for t in times)
        load = os.getloadavg()[0]
        results.append(dict(threads=threads, a_ms=a * 1e3, b_ms=b * 1e3, b_over_a=b / a, load_average=load))
        print(f"{threads} thread(s), batch {args.batch}: A {a * 1e3:.3f} ms, B {b * 1e3:.3f} ms, B/A {b / a:.3f} "
              f"(load {load:.2f})", flush=True)
    record = dict(file=args.file, version_a=str(args.version_a), version_b=str(args.version_b), batch=args.batch,
                  rounds=args.rounds, commit=commit(), machine=machine(), results=results)
    with open(REPO / "bench" / "results" / "fused-ab.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
