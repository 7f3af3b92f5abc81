"""Probe: what checking every tensor's CRC-32 at load costs (spec/FORMAT.md §5), against load-to-first-token.

Each round runs `nqrun FILE -p PROMPT -n 1 --stats` in a fresh process twice, with and without `--no-verify`
(alternating which goes first), and reads its "time to first token" (from process start: imports, load, checks,
prefill); then times `NQFile.verify()` alone in this process. The file is read once before the rounds, so every
figure is with the file in the page cache (what a second run of the same model sees).

    python bench/probes/verify_cost.py FILE [--rounds 5]

Appends one JSON line to bench/results/verify-cost.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The capital of France is"


def first_token_seconds(path: Path, verify: bool) -> float:
    cmd = [sys.executable, "-c", "import sys; sys.argv[0] = 'nqrun'; from runtime.cli import run_main; run_main()",
           str(path), "-p", PROMPT, "-n", "1", "--temperature", "0", "--stats", *([] if verify else ["--no-verify"])]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    return float(re.search(r"time to first token: ([0-9.]+) s", done.stderr).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from nqfmt import open_nq

    args.file.read_bytes()  # into the page cache
    with_verify, without, verify_alone = [], [], []
    for r in range(args.rounds):
        for verify in ((True, False) if r % 2 == 0 else (False, True)):
            (with_verify if verify else without).append(first_token_seconds(args.file, verify))
        f = open_nq(args.file)
        start = time.perf_counter()
        f.verify()
        verify_alone.append(time.perf_counter() - start)
    load = os.getloadavg()
    ttft_verify, ttft_plain = statistics.median(with_verify), statistics.median(without)
    result = {
        "file": str(args.file), "file_bytes": args.file.stat().st_size, "rounds": args.rounds,
        "ttft_seconds_verify": with_verify, "ttft_seconds_no_verify": without, "verify_seconds": verify_alone,
        "median_ttft_verify": ttft_verify, "median_ttft_no_verify": ttft_plain,
        "median_verify_seconds": statistics.median(verify_alone),
        "verify_share_of_ttft": statistics.median(verify_alone) / ttft_plain,
        "verify_gb_per_s": args.file.stat().st_size / statistics.median(verify_alone) / 1e9,
        "load_average": load,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=REPO).stdout.strip(),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = REPO / "bench" / "results" / "verify-cost.jsonl"
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=1))


if __name__ == "__main__":
    main()
