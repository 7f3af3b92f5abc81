"""Time to open a .nq file: nqfmt's reader (validation included) against the gguf package's GGUFReader.

    python bench/open_time.py FILE.nq

Writes bench/results/open-time-<file stem>.json.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from gguf import GGUFReader

from nqfmt import open_nq


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(path: str) -> None:
    nq = best_of(lambda: open_nq(path), 5)
    gg = best_of(lambda: GGUFReader(path), 3)
    result = {
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cpus",
        "load_average": os.getloadavg(),
        "file": path, "file_bytes": Path(path).stat().st_size,
        "nqfmt_open_s": nq, "gguf_reader_open_s": gg, "speedup": gg / nq,
    }
    out = Path(__file__).parent / "results" / f"open-time-{Path(path).stem}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"nqfmt open (validated): {nq * 1e3:.1f} ms; gguf.GGUFReader: {gg * 1e3:.1f} ms ({gg / nq:.1f}x)")


if __name__ == "__main__":
    main(sys.argv[1])
