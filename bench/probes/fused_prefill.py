"""Probe: a prompt through the fused decode blocks (numba_decode.py, its tokens sharing one cache) against the op-by-op
prefill (Model._decoder: each op one call, binary linears token by token over the threads), by prompt length.

For 1 and 2 threads and prompts of 8 to 512 random tokens at position 0: the best of `--rounds` wall times of the
decoder blocks alone (no embedding lookups' difference, no head), as prompt tokens per second, and the largest
difference between the two results relative to the largest value (float32 summation order only). It is what
FusedBlocks.max_tokens (numba_decode.PROMPT_TOKENS, one worker: 1) rests on.

    python bench/probes/fused_prefill.py FILE [--rounds 3]

Prints one line per configuration and appends one JSON line to bench/results/fused-prefill.jsonl. Run it on an
otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.speed import commit  # noqa: E402

LENGTHS = (8, 29, 64, 128, 256, 512)


def measure(path: str, threads: int, rounds: int) -> list[dict]:
    import numpy as np

    import runtime
    model = runtime.load(path, backend="numba", threads=threads, n_ctx=max(LENGTHS)).model
    rng = np.random.default_rng(0)
    rows = []
    for length in LENGTHS:
        ids = rng.integers(0, model.config.vocab, length)
        x = model._embed(ids)
        positions = np.arange(length)
        def op_by_op(cache):
            def attend(layer, q, k, v, window):
                return model.backend.attention(cache, layer, q, k, v, 0, window, model.config.attention_scale,
                                               model.config.attn_softcap)
            return model._decoder(ids, positions, attend)

        runs = {"op_by_op": op_by_op, "fused": lambda cache: model._fused(x, positions, [cache] * length)}
        best, out = {}, {}
        for name, run in runs.items():
            times = []
            for _ in range(rounds):
                cache = model.new_cache(max(LENGTHS))
                start = time.perf_counter()
                out[name] = np.asarray(run(cache))
                times.append(time.perf_counter() - start)
            best[name] = length / min(times)
        diff = float(np.abs(out["fused"] - out["op_by_op"]).max() / np.abs(out["op_by_op"]).max())
        rows.append(dict(threads=threads, tokens=length, op_by_op_tps=best["op_by_op"], fused_tps=best["fused"],
                         max_relative_difference=diff))
        print(f"{threads} thread(s), {length} tokens: op by op {best['op_by_op']:.0f} tok/s, fused "
              f"{best['fused']:.0f} tok/s ({best['fused'] / best['op_by_op']:.2f}x), relative difference {diff:.1e}",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    before = os.getloadavg()
    rows = [r for threads in (1, 2) for r in measure(str(args.file), threads, args.rounds)]
    after = os.getloadavg()
    print(f"load average {before[0]:.2f} -> {after[0]:.2f}")
    with open(REPO / "bench" / "results" / "fused-prefill.jsonl", "a") as f:
        f.write(json.dumps(dict(file=str(args.file), commit=commit(), rounds=args.rounds, rows=rows,
                                load_average_before=before, load_average_after=after,
                                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))) + "\n")


if __name__ == "__main__":
    main()
