"""The numba backend's output head and embedding per table kind (spec/FORMAT.md §3.4), alone, on a model's shape
with random values (speed does not depend on them).

    python bench/head_kernels.py [--vocab 49152] [--hidden 576] [--threads 1] [--tokens 1 8 64] [--rank 576]
                                 [--hot 5120] [--label NAME]

Times the head for each token count, with every product in float32 (`exact`) and as the runtime runs it by default
(`default`: a 4-bit or Q8_0 head on int8 tokens where the CPU has AVX-512 VNNI, or AVX2 without AVX-512), and
one-token embedding lookups, best of `--rounds`; writes bench/results/head-kernels-<vocab>x<hidden>-t<threads>[-<label>].json
with the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import git_commit, machine  # noqa: E402
from nqfmt import BinaryPath, FactoredLinear, pack_signs  # noqa: E402
from nqfmt.keys import GGMLType  # noqa: E402
from nqfmt.q4 import quantize_iq4_nl, quantize_q4_0  # noqa: E402
from runtime.backends import get_backend  # noqa: E402


def tables(backend, rng, vocab: int, hidden: int, rank: int, hot: int) -> dict:
    values = rng.standard_normal((vocab, hidden)).astype(np.float32)
    from gguf.quants import quantize
    hot_ids = np.sort(rng.choice(vocab, hot, replace=False))
    cold = np.setdiff1d(np.arange(vocab), hot_ids)
    factored = FactoredLinear(vocab, hidden, (BinaryPath(
        pack_signs(rng.standard_normal((rank, hidden))), pack_signs(rng.standard_normal((vocab, rank))),
        np.ones(hidden, np.float16), np.ones(vocab, np.float16), None, rank),), None)
    return {"F16": backend.prepare_embedding(values.astype(np.float16), GGMLType.F16, hidden),
            "Q8_0": backend.prepare_embedding(quantize(values, GGMLType.Q8_0), GGMLType.Q8_0, hidden),
            "Q4_0": backend.prepare_embedding(quantize_q4_0(values), GGMLType.Q4_0, hidden),
            "IQ4_NL": backend.prepare_embedding(quantize_iq4_nl(values), GGMLType.IQ4_NL, hidden),
            f"IQ4_NL+{hot}": backend.prepare_hot_table(quantize_iq4_nl(values[cold]), GGMLType.IQ4_NL, hot_ids,
                                                       quantize(values[hot_ids], GGMLType.Q8_0), vocab, hidden),
            f"binary:{rank}": backend.prepare_factored_table(factored)}


def best(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--rank", type=int, default=576)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--hot", type=int, default=5120, help="hot rows (Q8_0) of the IQ4_NL+K kind")
    ap.add_argument("--label", default="", help="suffix of the JSON's name (e.g. the host's kind)")
    args = ap.parse_args()
    load_before = os.getloadavg()
    head_ms: dict[str, dict[str, dict[int, float]]] = {}
    for mode in ("exact", "default"):
        backend = get_backend("numba", threads=args.threads, exact=mode == "exact")
        kinds = tables(backend, np.random.default_rng(0), args.vocab, args.hidden, args.rank, args.hot)
        head_ms[mode] = {k: {} for k in kinds}
        for tokens in args.tokens:
            x = np.random.default_rng(tokens).standard_normal((tokens, args.hidden)).astype(np.float32)
            for kind, table in kinds.items():
                head_ms[mode][kind][tokens] = 1e3 * best(lambda: backend.head(table, x), args.rounds)
                print(f"head {mode:7s} {kind:12s} {tokens:3d} tokens {head_ms[mode][kind][tokens]:8.2f} ms", flush=True)
    ids = np.random.default_rng(1).integers(0, args.vocab, 1)
    embed_us = {k: 1e6 * best(lambda: backend.embed(t, ids), args.rounds) for k, t in kinds.items()}
    record = {"commit": git_commit(), "machine": machine(), "load_average_start": load_before,
              "load_average_end": os.getloadavg(), "vocab": args.vocab, "hidden": args.hidden, "rank": args.rank,
              "threads": args.threads, "rounds": args.rounds, "int8_head": backend.int8_head, "head_ms": head_ms,
              "embed_one_token_us": embed_us}
    label = f"-{args.label}" if args.label else ""
    out = ROOT / "bench" / "results" / f"head-kernels-{args.vocab}x{args.hidden}-t{args.threads}{label}.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps({"embed_one_token_us": embed_us, "load_average": record["load_average_end"]}))


if __name__ == "__main__":
    main()
