"""Probe: a new machine's first `nqrun`, when numba compiles every kernel it uses (the cache is empty).

Runs `nqrun FILE --prompt ... -n 16` in a fresh process with NUMBA_CACHE_DIR pointing at an empty directory, then
again with that cache filled, from the given source tree (default: this one), and reports both wall times. A tree
is any checkout of this repository, e.g. `git worktree add DIR REV`, so two commits can be compared.

    python bench/probes/cold_start.py FILE [--tree DIR] [--threads T]

Prints the times and appends one JSON line to bench/results/cold-start.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.speed import commit, machine  # noqa: E402

RUN = "import sys; from runtime.cli import run_main; sys.argv[0] = 'nqrun'; run_main()"


def timed_run(tree: Path, path: str, threads: int | None, cache: str) -> float:
    """Wall seconds of one nqrun process importing the runtime of `tree`, its kernels cached under `cache`."""
    argv = [sys.executable, "-c", RUN, path, "--prompt", "The capital of France is", "-n", "16"]
    if threads:
        argv += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(tree), NUMBA_CACHE_DIR=cache)
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--tree", type=Path, default=REPO)
    ap.add_argument("--threads", type=int, help="nqrun's --threads (default: its own)")
    args = ap.parse_args()
    tree = args.tree.resolve()
    head = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="nq-cold-") as cache:
        cold = timed_run(tree, os.path.abspath(args.file), args.threads, cache)
        warm = timed_run(tree, os.path.abspath(args.file), args.threads, cache)
    load = os.getloadavg()[0]
    print(f"{head}: first run {cold:.1f} s (empty kernel cache), second {warm:.1f} s, load {load:.2f}")
    record = dict(file=args.file, tree=head, threads=args.threads, cold_s=cold, warm_s=warm, load_average=load,
                  commit=commit(), machine=machine())
    with open(REPO / "bench" / "results" / "cold-start.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
