"""What the int8 head (the runtime's default on AVX-512 VNNI CPUs) costs in accuracy and buys in speed, on one file.

Perplexity on the protocol's windows (spec/EVALUATION.md §2: the first --windows windows of 2048 tokens of the test
text, as `nqeval`), with `exact=True` (every product in float32) and the default; then teacher-forced decoding (one
token per forward pass) over the first --tokens tokens: top-1 agreement of the next-token argmax, the mean relative L2
difference of the logits, and decode tok/s of each.

Usage: python -m bench.probes.int8_accuracy FILE [--windows 40] [--tokens 256] [--threads 2]
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
from runtime.perplexity import perplexity

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
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    exact = runtime.load(a.file, backend="numba", threads=a.threads, exact=True)
    fast = runtime.load(a.file, backend="numba", threads=a.threads)
    if not fast.backend.int8_head:
        raise SystemExit("this CPU lacks AVX-512 VNNI: the runtime keeps the exact head here, nothing to compare")
    text = default_text("test")
    ids = exact.tokenizer.encode(text.read_text(encoding="utf-8"), add_bos=False)
    load_before = os.getloadavg()
    ppl = {name: perplexity(m.model, ids, 2048, a.windows) for name, m in (("exact", exact), ("int8", fast))}
    forced = ids[:a.tokens + 1]
    le, te = teacher_forced(exact, forced)
    la, ta = teacher_forced(fast, forced)
    targets = np.asarray(forced[1:])
    res = dict(commit=commit(), machine=machine(), file=a.file.name, text=text.name, threads=a.threads,
               load_average_before=load_before, load_average_after=os.getloadavg(), windows=a.windows,
               ppl_exact=ppl["exact"].ppl, ppl_int8=ppl["int8"].ppl, ppl_ratio=ppl["int8"].ppl / ppl["exact"].ppl,
               eval_tps_exact=ppl["exact"].tokens_per_second, eval_tps_int8=ppl["int8"].tokens_per_second,
               forced_tokens=len(targets), top1_agreement=float(np.mean(le.argmax(1) == la.argmax(1))),
               logits_rel_l2=float(np.mean(np.linalg.norm(la - le, axis=1) / np.linalg.norm(le, axis=1))),
               decode_tps_exact=len(targets) / te, decode_tps_int8=len(targets) / ta)
    path = ROOT / "bench" / "results" / f"int8-accuracy-{a.file.stem}.json"
    path.write_text(json.dumps(res, indent=1))
    for k in ("ppl_exact", "ppl_int8", "ppl_ratio", "top1_agreement", "logits_rel_l2", "decode_tps_exact",
              "decode_tps_int8"):
        print(f"{k}: {res[k]:.4f}")
    print(path)


if __name__ == "__main__":
    main()
