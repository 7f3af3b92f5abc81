"""Probe: where a decoding step's time goes on the numba backend, and what a second core can add to it.

For 1 and 2 threads and steps of 1 and 8 sequences (each its own cache, positions 64-163) it times the fused blocks
(numba_decode.FusedBlocks: one compiled call for every block) and the output head separately, median of `--steps`
steps each. It also measures how long a cache line takes to move between the two cores (two workers of one parallel
region hand an atomic counter back and forth): every phase boundary of a step moves its inputs' lines that way.

    python bench/probes/decode_split.py FILE [--steps 200]

Prints one line per configuration and appends one JSON line to bench/results/decode-split.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.speed import commit  # noqa: E402


def handoff_ns(rounds: int = 200_000) -> float:
    """One-way hand-off of a cache line between two threads of a parallel region, in ns (median of 3)."""
    import numpy as np
    from numba import njit, prange

    from runtime.backends.numba_decode import atomic_add, atomic_load

    @njit(parallel=True, nogil=True)
    def pingpong(counter, n):
        for w in prange(2):
            for _ in range(n):
                while atomic_load(counter, 0) % 2 != w:
                    pass
                atomic_add(counter, 0, 1)

    counter = np.zeros(16, np.int64)
    pingpong(counter, 10)
    times = []
    for _ in range(3):
        counter[:] = 0
        start = time.perf_counter()
        pingpong(counter, rounds)
        times.append((time.perf_counter() - start) / (2 * rounds) * 1e9)
    return statistics.median(times)


def split(path: str, threads: int, batch: int, steps: int) -> dict:
    """Median ms per step of the fused blocks and of the head, `batch` sequences per step."""
    import numpy as np

    import runtime
    model = runtime.load(path, backend="numba", threads=threads, n_ctx=512).model
    caches = [model.new_cache(512) for _ in range(batch)]
    x = model._embed(np.arange(1000, 1000 + batch, dtype=np.int64))
    for i in range(64):
        model._fused(x, np.full(batch, i), caches)

    def median_ms(run) -> float:
        times = []
        for i in range(steps):
            start = time.perf_counter()
            run(i)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    blocks = median_ms(lambda i: model._fused(x, np.full(batch, 64 + i % 100), caches))
    head = median_ms(lambda i: model._logits(x))
    return dict(threads=threads, batch=batch, blocks_ms=blocks, head_ms=head,
                tokens_per_s=batch / (blocks + head) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--child", nargs=2, type=int, metavar=("THREADS", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        threads, batch = args.child
        print(json.dumps(handoff_ns() if batch == 0 else split(args.file, threads, batch, args.steps)))
        return
    result = dict(file=args.file, steps=args.steps, commit=commit(), cpus=os.cpu_count(),
                  load_average_start=os.getloadavg(), runs=[])
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for threads, batch in [(2, 0), (1, 1), (2, 1), (1, 8), (2, 8)]:  # batch 0: the hand-off
        out = subprocess.run([sys.executable, __file__, args.file, "--steps", str(args.steps), "--child",
                              str(threads), str(batch)], env=env, capture_output=True, text=True, check=True)
        value = json.loads(out.stdout.strip().splitlines()[-1])
        if batch == 0:
            result["handoff_ns"] = value
            print(f"cache line hand-off between the two cores: {value:.0f} ns")
        else:
            result["runs"].append(value)
            print(f"{threads} thread(s), {batch} sequence(s): blocks {value['blocks_ms']:.3f} ms, head "
                  f"{value['head_ms']:.3f} ms per step, {value['tokens_per_s']:.0f} tok/s")
    result["load_average_end"] = os.getloadavg()
    print(f"load average {result['load_average_start'][0]:.2f} -> {result['load_average_end'][0]:.2f}")
    with open(REPO / "bench" / "results" / "decode-split.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
