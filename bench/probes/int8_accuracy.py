"""What the opt-in int8 popcount linears cost in accuracy and buy in speed, on one `.nq` file.

Teacher-forced decoding (one token per forward pass, the path --int8 changes) over the first --tokens tokens of a
text, exact float32 LUT kernels vs int8: top-1 agreement of the next-token argmax, perplexity of each over those
tokens, the mean relative L2 difference of the logits, and decode tok/s of each.

Usage: python -m bench.probes.int8_accuracy FILE [--text T] [--tokens 256] [--threads 1]
Writes bench/results/int8-accuracy-<file stem>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import runtime
from nqdata import default_text

from bench.speed import ROOT, commit, machine


def teacher_forced(m: runtime.LanguageModel, ids: list[int]) -> tuple[np.ndarray, float]:
    """Logits after each of ids[:-1], each from a single-token forward pass; and the seconds it took."""
    model = m.model
    cache = model.new_cache(len(ids))
    out = []
    start = time.perf_counter()
    for pos, tok in enumerate(ids[:-1]):
        out.append(model.forward(np.asarray([tok]), pos, cache)[0])
    return np.asarray(out, dtype=np.float64), time.perf_counter() - start


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
    top = logits.max(axis=1)
    logz = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return float(np.mean(logz - logits[np.arange(len(targets)), targets]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--text", type=Path, default=None, help="default: the project's test text (nqdata)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    exact = runtime.load(a.file, backend="numba", threads=a.threads)
    approx = runtime.load(a.file, backend="numba", threads=a.threads, exact=False)
    text = a.text or default_text("test")
    ids = exact.tokenizer.encode(text.read_text(encoding="utf-8")[:20000], add_bos=False)[:a.tokens + 1]
    load_before = os.getloadavg()
    le, te = teacher_forced(exact, ids)
    la, ta = teacher_forced(approx, ids)
    targets = np.asarray(ids[1:])
    res = dict(commit=commit(), machine=machine(), file=str(a.file), text=str(text), tokens=len(targets),
               threads=a.threads, load_average_before=load_before, load_average_after=os.getloadavg(),
               top1_agreement=float(np.mean(le.argmax(1) == la.argmax(1))),
               ppl_exact=float(np.exp(nll(le, targets))), ppl_int8=float(np.exp(nll(la, targets))),
               logits_rel_l2=float(np.mean(np.linalg.norm(la - le, axis=1) / np.linalg.norm(le, axis=1))),
               decode_tps_exact=len(targets) / te, decode_tps_int8=len(targets) / ta)
    path = ROOT / "bench" / "results" / f"int8-accuracy-{a.file.stem}.json"
    path.write_text(json.dumps(res, indent=1))
    for k in ("top1_agreement", "ppl_exact", "ppl_int8", "logits_rel_l2", "decode_tps_exact", "decode_tps_int8"):
        print(f"{k}: {res[k]:.4f}")
    print(path)


if __name__ == "__main__":
    main()
