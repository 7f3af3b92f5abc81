"""Probe: decode speed after a long prompt, ours against llama.cpp Q4_0 in its default configuration.

bench/speed.py decodes after a 29-token prompt, where attention is a small part of a step. Here each run prefills
P tokens (the first 512 tokens of the default test text, repeated to length P), then decodes --tokens tokens
greedily, one single-token pass each, timed from the first generated token to the last (bench/speed.py's workers,
each run a fresh process, the context P + tokens + 1). Engines alternate run by run; the best of --rounds is kept.
llama.cpp's default configuration is probed first and its fallback recorded, as in bench/speed.py.

    python bench/probes/long_context.py FILE [--positions 128 1024 2000] [--threads 1 2] [--rounds 2] [--tokens 32]
                                        [--llama-build DIR]

Prints one line per run and the best per configuration; appends one JSON line to bench/results/long-context.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.speed import (Engine, commit, llama_build, llama_files, llama_plan, machine, original_q4_1,  # noqa: E402
                         run_worker, use_llama_build)


def prompt(ids: list[int], length: int) -> list[int]:
    """`ids` repeated to `length` tokens."""
    return (ids * (length // len(ids) + 1))[:length]


def peer_label(engine: Engine) -> str:
    return f"llama.cpp Q4_0 [{engine.llama_config}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path, help="our .nq file of SmolLM2-135M (converted or bench/synthetic_model.py)")
    ap.add_argument("--positions", nargs="+", type=int, default=[128, 1024, 2000])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--work", type=Path, help="llama.cpp's files, as bench/speed.py's --work",
                    default=Path(os.environ.get("NANOQUANT_BENCH_DIR", Path(tempfile.gettempdir()) / "nq-bench")))
    ap.add_argument("--llama-build", type=Path, default=None, metavar="DIR",
                    help="the llama-cpp-python installed in DIR, as bench/speed.py's --llama-build")
    a = ap.parse_args()
    use_llama_build(a.llama_build)
    if not a.file.is_file():
        raise SystemExit(f"error: {a.file}: no such file")
    a.work.mkdir(parents=True, exist_ok=True)
    q4_0 = [(q, p) for q, p in llama_files("smollm2-135m", a.work) if q == "Q4_0"]
    peers, probes = llama_plan(q4_0, "default", max(a.threads))
    text = run_worker("tokenize", str(original_q4_1()))["long"]
    load_before = os.getloadavg()
    runs: list[dict] = []
    for rnd in range(a.rounds):
        for pos in a.positions:
            ids, n_ctx = prompt(text, pos), pos + a.tokens + 1
            for t in a.threads:
                timed = [("ours", run_worker("ours", str(a.file), t, a.tokens, ids, None, n_ctx))]
                timed += [(peer_label(e), run_worker("llama", e.path, t, a.tokens, ids, e.llama_config, n_ctx))
                          for e in peers]
                for label, r in timed:
                    runs.append(dict(round=rnd + 1, position=pos, threads=t, engine=label,
                                     decode_tps=r["decode_tps"], prefill_tps=r["prefill_tps"]))
                    print(f"round {rnd + 1} position {pos} t{t} {label}: decode {r['decode_tps']:.1f} tok/s "
                          f"(prefill {r['prefill_tps']:.0f} tok/s); load {os.getloadavg()[0]:.2f}", flush=True)
    best: dict[str, float] = {}
    for r in runs:
        key = f"{r['engine']} t{r['threads']} @{r['position']}"
        best[key] = max(best.get(key, 0.0), r["decode_tps"])
    peer = peer_label(peers[0])
    ratios = {f"t{t} @{pos}": best[f"ours t{t} @{pos}"] / best[f"{peer} t{t} @{pos}"]
              for t in a.threads for pos in a.positions}
    for k, v in best.items():
        print(f"best {k}: {v:.1f} tok/s")
    for k, v in ratios.items():
        print(f"ours / llama.cpp Q4_0 {k}: {v:.2f}x")
    record = dict(file=str(a.file), commit=commit(), machine=machine(), load_average_before=load_before,
                  load_average_after=os.getloadavg(), tokens=a.tokens, rounds=a.rounds, statistic="best of rounds",
                  llama_build=llama_build(), llama_default_probe=probes, best_decode_tps=best,
                  ours_over_llama=ratios, runs=runs,
                  command="python bench/probes/long_context.py " + " ".join(sys.argv[1:]))
    with open(REPO / "bench" / "results" / "long-context.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
