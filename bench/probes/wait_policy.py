"""Probe: nqrun's decode speed with OpenMP workers that sleep as soon as a parallel region ends (OMP_WAIT_POLICY=
passive) against workers that spin a few ms first (the runtime's default, numba_cpu.SPIN_AFTER_REGION).

Each configuration runs in a fresh process: greedy generation of 128 tokens after a 25-token prompt, best of 3, at 1
and 2 threads (decode tok/s as `nqrun --stats` reports it). A token's fused blocks and its head are two parallel
regions; a sleeping worker is woken by the region's start and joins it late.

    python bench/probes/wait_policy.py FILE [--rounds 2]

Prints one line per configuration and appends one JSON line to bench/results/wait-policy.jsonl. Run it on an
otherwise idle machine. nqserve keeps the passive policy (bench/serve.py measures why).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.speed import child_env, commit  # noqa: E402

PROMPT = "The history of the city begins in the early medieval period, when a small settlement grew up around the river"
CHILD = """
import sys, runtime
m = runtime.load(sys.argv[1], backend="numba", threads=int(sys.argv[2]), n_ctx=512)
best = 0.0
for _ in range(3):
    m.generate(sys.argv[3], max_tokens=129, temperature=0)
    best = max(best, m.stats.decode_tps)
print(best)
"""
POLICIES = {"passive": {"OMP_WAIT_POLICY": "passive"}, "spin (default)": {}}


def decode_tps(path: str, threads: int, extra: dict) -> float:
    env = {k: v for k, v in child_env(str(REPO)).items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                                       "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(threads), PROMPT], env={**env, **extra},
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per configuration (best is kept)")
    args = ap.parse_args()
    before = os.getloadavg()
    rows = []
    for threads in (1, 2):
        for name, extra in POLICIES.items():
            runs = [decode_tps(args.file, threads, extra) for _ in range(args.rounds)]
            rows.append(dict(policy=name, threads=threads, decode_tps=max(runs), runs=runs))
            listed = ", ".join(f"{r:.1f}" for r in runs)
            print(f"{name}, {threads} thread(s): decode {max(runs):.1f} tok/s (runs {listed})", flush=True)
    after = os.getloadavg()
    print(f"load average {before[0]:.2f} -> {after[0]:.2f}")
    with open(REPO / "bench" / "results" / "wait-policy.jsonl", "a") as f:
        f.write(json.dumps(dict(file=args.file, commit=commit(), rows=rows, load_average_before=before,
                                load_average_after=after, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
                + "\n")


if __name__ == "__main__":
    main()
