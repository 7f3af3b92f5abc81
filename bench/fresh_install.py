"""The README's first command as a new user runs it, timed, and its file scored: the headline `quick` figure.

    python bench/fresh_install.py WORKDIR [--commit REV]

In WORKDIR: a fresh clone of this repository at REV (default HEAD), a fresh virtual environment, an empty
NANOQUANT_CACHE, then the Quick start's four parts in order (pip install torch, pip install -e ".[convert]",
nqconvert ... --preset quick, nqrun ...), each timed; the converted file is then scored by spec/EVALUATION.md §2 on the
40 test windows and on bench/texts/alice.txt (bench/probes/text_shift.py), in this environment. Writes
bench/results/fresh-install-quick-<commit>.json. A WORKDIR that already holds the converted file is only scored (the
times recorded then are kept in WORKDIR/times.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.probes.text_shift import OTHER_TEXT, ratios  # noqa: E402
from bench.quality import RESULTS, machine, test_text  # noqa: E402
from nqfmt import open_nq  # noqa: E402

PROMPT = "The capital of France is"


def timed(cmd: str, cwd: Path, env: dict, log: Path) -> float:
    """Run one shell command (output to log); its wall seconds. A failure stops the whole run."""
    start = time.monotonic()
    with open(log, "w") as f:
        subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return round(time.monotonic() - start, 1)


def install_and_convert(work: Path, rev: str) -> dict:
    """The clone, the venv and the README's first command, part by part; the times and load averages."""
    repo, venv = work / "repo", work / "venv"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", NANOQUANT_CACHE=str(work / "cache"))
    times = {"commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                      check=True).stdout.strip()}
    times["install_seconds"] = timed('pip install torch==2.13.0 && pip install -e ".[convert]"', repo, env,
                                     work / "install.log")
    times["load_average_start"] = os.getloadavg()
    times["convert_seconds"] = timed("nqconvert smollm2-135m smollm2-135m.nq --preset quick", repo, env,
                                     work / "convert.log")
    times["load_average_end"] = os.getloadavg()
    times["nqrun_seconds"] = timed(f'nqrun smollm2-135m.nq --prompt "{PROMPT}"', repo, env, work / "nqrun.log")
    times["packages"] = subprocess.run(["pip", "freeze"], cwd=repo, env=env, capture_output=True, text=True,
                                       check=True).stdout.split()
    (work / "times.json").write_text(json.dumps(times, indent=1))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--commit", default="HEAD")
    args = ap.parse_args()
    nq = args.work / "repo" / "smollm2-135m.nq"
    if nq.exists():
        times = json.loads((args.work / "times.json").read_text())
    else:
        args.work.mkdir(parents=True, exist_ok=False)
        times = install_and_convert(args.work, args.commit)
    provenance = open_nq(nq).provenance
    scores = ratios(nq, "smollm2-135m", {"test": test_text(), "other": OTHER_TEXT}, 40)
    record = {"what": "the README's first command on a fresh clone, fresh venv, empty cache; the file scored by "
                      "bench/probes/text_shift.py (spec/EVALUATION.md §2)",
              **times, "machine": machine(), "file_bytes": nq.stat().st_size,
              "bpw_decoder_linears": provenance.bits_achieved,
              "bpw_whole_file": 8 * nq.stat().st_size / provenance.source_params,
              "calibration_windows_sha256": provenance.calibration_sha256, "recipe": json.loads(provenance.recipe),
              **scores}
    out = RESULTS / f"fresh-install-quick-{times['commit'][:7]}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("commit", "convert_seconds", "file_bytes", "test", "other")}, indent=1))


if __name__ == "__main__":
    main()
