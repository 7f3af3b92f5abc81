"""Probe: where nqrun's time to first token goes, and the floor under it that the runtime's dependencies set.

Each round runs two fresh processes on a file already in the page cache:
- floor: import numpy; import numba; call one cached @njit function (numba builds its typing and target registries
  on the first call of any compiled function); load the file's tokenizer.json with the `tokenizers` library. No
  numba runtime with an HF tokenizer starts faster than this.
- runtime: import runtime (numba and every kernel module), runtime.load (file checks, tokenizer, weights prepared,
  one warm-up step that loads the compiled kernels), then prefill a 29-token prompt and pick the first token.
Times run from the child's first statement (interpreter start-up, ~30 ms, excluded, as in bench/speed.py); the
children run with Python's default bytecode cache (bench.speed.child_env).

    python bench/probes/ttft_floor.py FILE [--rounds 5] [--threads 1]

Prints the medians and appends one JSON line to bench/results/ttft-floor.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.speed import child_env, commit  # noqa: E402

FLOOR = """
import sys, time, json
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import numba
t2 = time.perf_counter()
@numba.njit(cache=True)
def _first(x):
    return x.sum()
_first(np.ones(3))
t3 = time.perf_counter()
from nqfmt import open_nq
text = open_nq(sys.argv[1]).tokenizer.json
from tokenizers import Tokenizer
t4 = time.perf_counter()
Tokenizer.from_str(text)
t5 = time.perf_counter()
print(json.dumps(dict(numpy=t1 - t0, numba_import=t2 - t1, numba_first_call=t3 - t2, tokenizer=t5 - t4,
                      floor=(t3 - t0) + (t5 - t4))))
"""

RUNTIME = """
import sys, time, json
t0 = time.perf_counter()
import runtime
from runtime.generate import GenerationStats
from runtime.sampling import Sampler, SamplingParams
t1 = time.perf_counter()
m = runtime.load(sys.argv[1], backend="numba", threads=int(sys.argv[2]), n_ctx=1024)
t2 = time.perf_counter()
stats = GenerationStats()
list(m.generator.tokens(list(range(100, 129)), 1, Sampler(SamplingParams(temperature=0)), frozenset(), stats))
t3 = time.perf_counter()
print(json.dumps(dict(imports=t1 - t0, load=t2 - t1, prefill_first_token=t3 - t2, ttft=t3 - t0)))
"""


def child(script: Path, path: Path, threads: int) -> dict:
    env = child_env(str(REPO))
    out = subprocess.run([sys.executable, str(script), str(path), str(threads)], env=env, capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"error: {script.name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="the runtime's threads (the floor does not depend on it)")
    args = ap.parse_args()
    args.file.read_bytes()  # into the page cache
    with tempfile.TemporaryDirectory() as tmp:  # scripts in files: numba caches only functions defined in one
        floor, run = Path(tmp) / "floor.py", Path(tmp) / "runtime_ttft.py"
        floor.write_text(FLOOR)
        run.write_text(RUNTIME)
        child(floor, args.file, 1), child(run, args.file, args.threads)  # kernel caches written, if they were not
        rounds = [dict(floor=child(floor, args.file, 1), runtime=child(run, args.file, args.threads))
                  for _ in range(args.rounds)]
    med = {part: {k: statistics.median(r[part][k] for r in rounds) for k in rounds[0][part]}
           for part in ("floor", "runtime")}
    result = dict(file=str(args.file), commit=commit(), rounds=args.rounds, threads=args.threads, median_s=med,
                  all=rounds, load_average=os.getloadavg(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for part, values in med.items():
        print(part + ": " + ", ".join(f"{k} {v:.3f} s" for k, v in values.items()))
    print(f"load average {os.getloadavg()[0]:.2f}")
    with open(REPO / "bench" / "results" / "ttft-floor.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
