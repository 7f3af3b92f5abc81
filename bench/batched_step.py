"""The batched decoding step (runtime Model.step) on one file: wall time per step and where it goes, for B sequences.

For each B: B sequences each prefilled with --prompt-tokens random ids, then --steps steps of one token per sequence
(positions advance as in decoding). Reported per B: the best and median step wall time, tokens per second
(B / best), and the time inside each backend op (linear, head, attention, ...; summed over one step, median over
steps), the rest being Python between ops. Where the step splits its sequences over threads
(`threads_per_step`), the ops of both threads add up, so their sum can exceed the wall time. Single-process, no
server: this is the ceiling nqserve's engine works under.

Usage: python -m bench.batched_step --nq FILE.nq [--batch 1 2 4 8 16] [--threads T] [--steps 20]
Writes bench/results/batched-step-<file stem>-t<threads>.json (-p<P> added with --prompt-tokens P other than 32).
Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.speed import commit, machine

ROOT = Path(__file__).resolve().parent.parent
OPS = ("embed", "linear", "rms_norm", "rope", "attention", "attention_batch", "glu", "head")


def timed_backend(backend) -> Counter:
    """Wrap the backend's ops so each call's wall time adds to the returned counter."""
    spent: Counter = Counter()
    for name in OPS:
        op = getattr(backend, name)

        def wrapped(*args, _op=op, _name=name, **kw):
            start = time.perf_counter()
            out = _op(*args, **kw)
            spent[_name] += time.perf_counter() - start
            return out

        setattr(backend, name, wrapped)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description="Model.step wall time and breakdown for B sequences")
    ap.add_argument("--nq", type=Path, required=True)
    ap.add_argument("--batch", nargs="*", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    a = ap.parse_args()
    import runtime
    lm = runtime.load(a.nq, backend="numba", threads=a.threads, n_ctx=a.prompt_tokens + a.steps + 2)
    model = lm.model
    spent = timed_backend(model.backend)
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    results = {}
    for b in a.batch:
        caches = [model.new_cache(a.prompt_tokens + a.steps + 2) for _ in range(b)]
        for cache in caches:
            model.forward(rng.integers(0, model.config.vocab, a.prompt_tokens), 0, cache)
        ids = rng.integers(0, model.config.vocab, b)
        model.step(ids, np.full(b, a.prompt_tokens), caches)  # the first call at this size loads its kernels
        walls, parts = [], []
        for s in range(1, a.steps + 1):
            spent.clear()
            start = time.perf_counter()
            model.step(ids, np.full(b, a.prompt_tokens + s), caches)
            walls.append(time.perf_counter() - start)
            parts.append(dict(spent))
        best, median = min(walls), float(np.median(walls))
        ops_ms = {op: float(np.median([p.get(op, 0.0) for p in parts])) * 1e3 for op in OPS}
        results[b] = dict(best_ms=best * 1e3, median_ms=median * 1e3, tokens_per_s=b / best,
                          threads_per_step=model.backend.step_threads(b, b), ops_median_ms=ops_ms,
                          python_ms=median * 1e3 - sum(ops_ms.values()))
        print(f"B={b:2d}: best {best * 1e3:6.2f} ms, median {median * 1e3:6.2f} ms, {b / best:6.1f} tok/s; "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(ops_ms.items(), key=lambda kv: -kv[1]) if v >= 0.01),
              flush=True)
    result = dict(commit=commit(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                  load_average_before=load_before, load_average_after=os.getloadavg(),
                  settings=dict(model=str(a.nq), threads=lm.info.threads, steps=a.steps,
                                prompt_tokens=a.prompt_tokens, command=" ".join(sys.argv)),
                  speedup_over_b1={str(b): r["tokens_per_s"] / results[a.batch[0]]["tokens_per_s"]
                                   for b, r in results.items()} if a.batch[0] == 1 else {},
                  batch={str(b): r for b, r in results.items()})
    prompt = "" if a.prompt_tokens == 32 else f"-p{a.prompt_tokens}"
    out = ROOT / "bench" / "results" / f"batched-step-{a.nq.stem}-t{lm.info.threads}{prompt}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
