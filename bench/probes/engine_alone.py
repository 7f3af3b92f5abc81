"""nqserve's engine without its HTTP side: how many tokens per second the continuous-batching engine itself gives.

N jobs of a 32-token random prompt and 128 sampled tokens each (temperature 0.8, a seed per job, as bench/serve.py's
clients ask) go to `nqserve.engine.Engine` in one process; their results go to a callback that only counts. Set
beside bench/serve.py's figures for the same file and client count, the difference is what HTTP, server-sent events
and the client processes cost; set beside bench/batched_step.py's, what sampling and the growing positions cost.

    python bench/probes/engine_alone.py FILE [--jobs 1 8] [--rounds 2] [--threads 2]

Prints tokens per second per round and appends one JSON line to bench/results/engine-alone.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402
from bench.speed import commit  # noqa: E402
from nqserve.engine import Done, Engine, Job  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402

PROMPT, TOKENS, PARALLEL, CTX = 32, 128, 8, 512  # bench/serve.py's request and nqserve's defaults there


def run_jobs(engine: Engine, jobs: int, rng: np.random.Generator, vocab: int) -> float:
    """Tokens per second for `jobs` jobs submitted at once, from the first submission to the last Done."""
    finished = threading.Semaphore(0)
    generated = []

    def emit(event) -> None:
        if isinstance(event, Done):
            generated.append(event.completion_tokens)
            finished.release()

    batch = [Job([int(i) for i in rng.integers(100, vocab, PROMPT)], TOKENS, SamplingParams(temperature=0.8, seed=k),
                 (), emit) for k in range(jobs)]
    start = time.perf_counter()
    for job in batch:
        engine.submit(job)
    for _ in batch:
        finished.acquire()
    return sum(generated) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    load = os.getloadavg()
    lm = runtime.load(args.file, backend="numba", threads=args.threads)
    engine = Engine(lm.model, lm.tokenizer, PARALLEL, CTX)
    engine.warm_up()
    engine.start()
    rng = np.random.default_rng(0)
    rounds = []
    try:
        for r in range(args.rounds):
            row = {str(j): run_jobs(engine, j, rng, lm.info.vocab) for j in args.jobs}
            print(f"round {r + 1}: " + ", ".join(f"{j} jobs {v:.1f} tok/s" for j, v in row.items()), flush=True)
            rounds.append(row)
    finally:
        engine.stop()
    best = {j: max(r[j] for r in rounds) for j in rounds[0]}
    result = dict(file=os.path.basename(args.file), commit=commit(), threads=lm.info.threads, rounds=rounds,
                  best_tok_s=best, load_average_start=load, load_average_end=os.getloadavg())
    with open(ROOT / "bench" / "results" / "engine-alone.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
