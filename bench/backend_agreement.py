"""Greedy decoding on every CPU backend of one `.nq` file: the issue's bar is identical tokens (64 by default), and
the numba logits within 1e-4 (relative to the largest) of the numpy reference's on the prompt.

Usage: python -m bench.backend_agreement FILE [--tokens 64] [--prompt TEXT]
Writes bench/results/agreement-<file stem>.json. The numpy backend unpacks every sign matrix per token: on
SmolLM2-135M this takes about a second per token.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import runtime
from runtime.generate import GenerationStats
from runtime.sampling import Sampler, SamplingParams

from .speed import ROOT, commit, machine

PROMPT = "The history of the city begins in the early medieval period, when"


def greedy(m: runtime.LanguageModel, ids: list[int], tokens: int) -> list[int]:
    """Exactly `tokens` greedy tokens (stop tokens included: the comparison is of the argmax sequence)."""
    return list(m.generator.tokens(ids, tokens, Sampler(SamplingParams(temperature=0)), frozenset(),
                                   GenerationStats()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", default=PROMPT)
    a = ap.parse_args()
    out: dict = dict(commit=commit(), machine=machine(), file=str(a.file), prompt=a.prompt, tokens=a.tokens,
                     load_average_before=os.getloadavg())
    models = {name: runtime.load(a.file, backend=name, threads=1) for name in ("numpy", "numba")}
    ids = models["numba"].tokenize(a.prompt)
    ref, fast = models["numpy"].logits(ids), models["numba"].logits(ids)
    out["prompt_logits_max_rel_diff"] = float(np.abs(fast - ref).max() / np.abs(ref).max())
    seqs = {}
    for name, m in models.items():
        start = time.perf_counter()
        seqs[name] = greedy(m, ids, a.tokens)
        out[f"{name}_seconds"] = time.perf_counter() - start
    same = seqs["numpy"] == seqs["numba"]
    first_diff = next((i for i, (x, y) in enumerate(zip(seqs["numpy"], seqs["numba"])) if x != y), None)
    out.update(identical=same, first_difference=first_diff, tokens_numpy=seqs["numpy"], tokens_numba=seqs["numba"],
               text=models["numba"].detokenize(seqs["numba"]), load_average_after=os.getloadavg())
    path = ROOT / "bench" / "results" / f"agreement-{a.file.stem}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"prompt logits: numba vs numpy max rel diff {out['prompt_logits_max_rel_diff']:.2e}")
    print(f"greedy {a.tokens} tokens identical across numpy and numba: {same}"
          + ("" if same else f" (first difference at token {first_diff})"))
    print(path)


if __name__ == "__main__":
    main()
