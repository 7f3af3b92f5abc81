"""Probe: how much a second core can add on this machine, independent of how a runtime shares work.

Runs the same one-thread job alone, then two copies at once in separate processes (nothing shared, no
synchronisation), and reports each copy's speed against the lone run. Jobs:
- `compute`: a numba loop of float32 multiply-adds on 64 KB that stays in L1 (what the cores alone can do);
- `decode`: nqrun's one-token decode of FILE on one thread (tokens/s over 64 greedy tokens).
If two copies each keep ~100%, two threads of one runtime may reach 2×; at 65% the ceiling of any 2-thread split is
~1.3×, whatever the runtime does.

    python bench/probes/core_scaling.py FILE [--rounds 3]

Prints the ratios and appends one JSON line to bench/results/core-scaling.jsonl.
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


def job_compute() -> float:
    """Billions of float32 multiply-adds per second on an L1-resident vector, one thread."""
    import numba
    import numpy as np

    @numba.njit(fastmath=True)
    def fma(a, rounds):
        acc = np.zeros_like(a)
        for _ in range(rounds):
            for i in range(a.size):
                acc[i] = acc[i] * np.float32(0.999) + a[i]
        return acc

    a = np.random.default_rng(0).random(16384).astype(np.float32)
    fma(a, 1)
    rounds = 20000
    t = time.perf_counter()
    fma(a, rounds)
    return a.size * rounds / (time.perf_counter() - t) / 1e9


def job_decode(path: str) -> float:
    """Greedy decode tokens/s of `path` on one thread."""
    import runtime
    from runtime.generate import GenerationStats
    from runtime.sampling import Sampler, SamplingParams
    m = runtime.load(path, backend="numba", threads=1, n_ctx=256)
    stats = GenerationStats()
    list(m.generator.tokens(list(range(100, 129)), 65, Sampler(SamplingParams(temperature=0)), frozenset(), stats))
    return stats.decode_tps


def spawn(job: str, path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, __file__, path, "--child", job, path], env=env, stdout=subprocess.PIPE, text=True)


def run(job: str, path: str, copies: int) -> list[float]:
    procs = [spawn(job, path) for _ in range(copies)]
    out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"error: a {job} child failed")
    return [float(o.strip().splitlines()[-1]) for o in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("JOB", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        job, path = args.child
        print(job_compute() if job == "compute" else job_decode(path))
        return
    result = dict(file=args.file, rounds=args.rounds, load_average_start=os.getloadavg(),
                  commit=commit(), cpus=os.cpu_count())
    for job in ("compute", "decode"):
        run(job, args.file, 1)  # kernels compiled / cached
        alone = [run(job, args.file, 1)[0] for _ in range(args.rounds)]
        pairs = [run(job, args.file, 2) for _ in range(args.rounds)]
        each = [v for pair in pairs for v in pair]
        ratio = statistics.median(each) / statistics.median(alone)
        result[job] = dict(alone=alone, two_at_once=pairs, each_of_two_over_alone=ratio)
        print(f"{job}: alone {statistics.median(alone):.2f}, each of two at once {statistics.median(each):.2f} "
              f"({ratio:.2f}x of alone; two together {2 * ratio:.2f}x)")
    result["load_average_end"] = os.getloadavg()
    print(f"load average {os.getloadavg()[0]:.2f}")
    with open(REPO / "bench" / "results" / "core-scaling.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
