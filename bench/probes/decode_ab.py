"""Probe: the numba backend's decode and batched step in two source trees, interleaved (A/B of a runtime change).

For each round, each thread count and each tree (in that order), a fresh process with the tree first on sys.path
loads FILE and measures: one sequence decoding 64 greedy tokens after a 29-token prompt (best of 2, tok/s), and the
batched step of 8 sequences (10 steps after 4, tok/s). Each tree's kernels are loaded (or compiled) by one run of
each thread count before the timed rounds. A tree is any checkout of this repository, e.g. `git worktree add DIR REV`.

    python bench/probes/decode_ab.py FILE TREE_A TREE_B [--rounds 3] [--threads 1 2]

Prints one line per run and appends one JSON line to bench/results/decode-ab.jsonl.
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


def child(path: str, threads: int) -> dict:
    import numpy as np

    import runtime
    from runtime.generate import GenerationStats
    from runtime.sampling import Sampler, SamplingParams
    lm = runtime.load(path, backend="numba", threads=threads, n_ctx=512)
    decode = 0.0
    for _ in range(2):
        stats = GenerationStats()
        list(lm.generator.tokens(list(range(1000, 1029)), 65, Sampler(SamplingParams(temperature=0)), frozenset(),
                                 stats))
        decode = max(decode, stats.decode_tps)
    model, batch = lm.model, 8
    caches = [model.new_cache(512) for _ in range(batch)]
    ids = np.arange(1000, 1000 + batch)
    for i in range(4):
        model.step(ids, np.full(batch, i), caches, np.ones(batch, np.int64))
    start = time.perf_counter()
    for i in range(10):
        model.step(ids, np.full(batch, 4 + i), caches, np.ones(batch, np.int64))
    step = (time.perf_counter() - start) / 10
    return dict(decode_tps=decode, batch8_tps=batch / step, fused=model._fused is not None)


def run(tree: Path, path: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, __file__, path, str(tree), str(tree), "--child", str(threads)], env=env,
                         cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("tree_a", type=Path)
    ap.add_argument("tree_b", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.file, args.child)))
        return
    sys.path.insert(0, str(REPO))  # not in the children: they import the runtime of their tree
    from bench.speed import commit, machine
    trees = [args.tree_a.resolve(), args.tree_b.resolve()]
    heads = [subprocess.run(["git", "-C", str(t), "describe", "--always", "--dirty"], capture_output=True, text=True,
                            check=True).stdout.strip() for t in trees]
    for tree in trees:
        for threads in args.threads:
            run(tree, args.file, threads)
    runs = []
    for rnd in range(args.rounds):
        for threads in args.threads:
            for tree, head in zip(trees, heads):
                r = dict(run(tree, args.file, threads), round=rnd + 1, threads=threads, tree=head,
                         load_average=os.getloadavg()[0])
                runs.append(r)
                print(f"round {r['round']} {head} {threads} thread(s): decode {r['decode_tps']:.1f} tok/s, batch of 8 "
                      f"{r['batch8_tps']:.1f} tok/s (fused: {r['fused']}), load {r['load_average']:.2f}", flush=True)
    result = dict(file=args.file, trees=heads, commit=commit(), machine=machine(), runs=runs)
    with open(REPO / "bench" / "results" / "decode-ab.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
