"""Probe: two versions of the fused decode step (runtime/backends/numba_decode.py), steps interleaved in one process.

Both versions are loaded from the given source files as modules of runtime.backends under their own names, and
their compiled walks are loaded (or compiled; numba's cache keeps them) before the model is. Each version builds its
own FusedBlocks over one model; the timed steps (the blocks of one decoding step, without the embedding and the
head) alternate A, B / B, A. The versions must share the model's kernels (STAGES) and Net layout.

A limit found with ad-hoc variants of this probe (not kept), on the AVX2 EPYC host: the same source runs 11-19%
slower or not depending on when its machine code is loaded. A copy of numba_decode.py loaded after the model and its
first forward pass was 11-19% slower than the module itself (which the model loads while warming up); loaded
before the model, the copy matched the module (0.995-1.011×) while only its walk was loaded early, and was 13-19%
slower again once its threaded caller was loaded early too. So a difference between two versions smaller than that
is not resolved here: it can be code placement (alignment, aliasing) as much as code.

    git show REV:runtime/backends/numba_decode.py > a.py     # and b.py: the version to compare
    python bench/probes/fused_ab.py FILE a.py b.py [--threads 1 2] [--batch 1] [--rounds 4] [--position 32]

Each round times 64 steps at positions --position .. --position + 63 (the caches first filled up to it).

Prints the median step per version and thread count, and appends one JSON line to bench/results/fused-ab.jsonl.
"""
from __future__ import annotations

import argparse
import hashlib
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


def load_version(path: Path):
    """The numba_decode source at `path` as a module of runtime.backends named after the file's path: numba's cache
    entries for a file name the module that compiled them, so a file keeps one module name from run to run."""
    full = "runtime.backends._fused_ab_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(full, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


def preload(version) -> None:
    """Load (or compile) the version's walk and its threaded caller for the argument types FusedBlocks passes."""
    from numba import typeof
    i64 = lambda *shape: np.zeros(shape, np.int64)  # noqa: E731
    f32 = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    net = version.Net(i64(1, 14), i64(1, 5), i64(1, 7), i64(25), f32(3), f32(1), f32(1, 1), f32(1, 1, 1), f32(1, 1),
                      i64(8))
    x, positions, caches = typeof(f32(1, 1)), typeof(i64(1)), typeof(i64(1, 3))
    version._blocks.compile((typeof(net), typeof(0), x, positions, caches))
    version.decode_threads.compile((typeof(net), x, positions, caches))


def timed_steps(path: str, versions: list, threads: int, batch: int, rounds: int,
                position: int) -> list[list[float]]:
    """Seconds per step of each version, 64 steps per round at positions position.., the order alternating."""
    n_ctx = position + 64
    lm = runtime.load(path, backend="numba", threads=threads, n_ctx=n_ctx)
    model = lm.model
    fused = [v.FusedBlocks(model, threads) for v in versions]
    caches = [model.new_cache(n_ctx) for _ in range(batch)]
    for c in caches:
        model.forward(np.random.default_rng(0).integers(100, 1000, position), 0, c)
    x = model._embed(np.full(batch, 5))
    for f in fused:  # the first call of each, outside the timing
        f(x, np.full(batch, position), caches)
    times: list[list[float]] = [[] for _ in versions]
    for _ in range(rounds):
        for pos in range(position, position + 64):
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
    ap.add_argument("--position", type=int, default=32, help="the first timed step's position")
    args = ap.parse_args()
    versions = [load_version(args.version_a), load_version(args.version_b)]
    for v in versions:
        preload(v)
    results = []
    for threads in args.threads:
        times = timed_steps(args.file, versions, threads, args.batch, args.rounds, args.position)
        a, b = (float(np.median(t)) for t in times)
        load = os.getloadavg()[0]
        results.append(dict(threads=threads, a_ms=a * 1e3, b_ms=b * 1e3, b_over_a=b / a, load_average=load))
        print(f"{threads} thread(s), batch {args.batch}, position {args.position}: A {a * 1e3:.3f} ms, "
              f"B {b * 1e3:.3f} ms, B/A {b / a:.3f} (load {load:.2f})", flush=True)
    record = dict(file=args.file, version_a=str(args.version_a), version_b=str(args.version_b), batch=args.batch,
                  position=args.position, rounds=args.rounds, commit=commit(), machine=machine(), results=results)
    with open(REPO / "bench" / "results" / "fused-ab.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
