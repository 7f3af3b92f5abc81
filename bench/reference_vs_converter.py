"""The runtime's numpy reference against the converter's quantized torch model (converter.torch_model.load_nq) on one
`.nq` file, and the numba backend against the numpy reference: max |difference| / max |reference| of the logits at
every position of a prompt (issue bars: 1e-3 and 1e-4).

Usage: python -m bench.reference_vs_converter FILE [--prompt TEXT]
Writes bench/results/reference-vs-converter-<file stem>.json. Imports torch (the runtime never does).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import runtime

from .speed import ROOT, commit, machine

PROMPT = "The history of the city begins in the early medieval period, when a small settlement grew"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--prompt", default=PROMPT)
    a = ap.parse_args()
    import torch
    from converter.torch_model import load_nq
    ref = runtime.load(a.file, backend="numpy")
    ids = ref.tokenize(a.prompt)
    ours = ref.logits(ids)
    with torch.no_grad():
        theirs = load_nq(a.file)(torch.tensor(ids)[None]).numpy().reshape(ours.shape)
    fast = runtime.load(a.file, backend="numba", threads=1).logits(ids)
    res = dict(commit=commit(), machine=machine(), file=str(a.file), prompt_tokens=len(ids),
               numpy_vs_converter_torch=float(np.abs(ours - theirs).max() / np.abs(theirs).max()),
               numba_vs_numpy=float(np.abs(fast - ours).max() / np.abs(ours).max()))
    path = ROOT / "bench" / "results" / f"reference-vs-converter-{a.file.stem}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"numpy vs converter torch: {res['numpy_vs_converter_torch']:.2e} (bar 1e-3); "
          f"numba vs numpy: {res['numba_vs_numpy']:.2e} (bar 1e-4)")
    print(path)


if __name__ == "__main__":
    main()
