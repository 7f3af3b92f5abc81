"""Text unlike the calibration text: the perplexity ratio of `.nq` files on another English text beside the default
test text, by the protocol of spec/EVALUATION.md §2 (2048-token windows, no BOS, full precision on the same windows).

    nice python bench/probes/text_shift.py FILE.nq [FILE.nq ...] [--model smollm2-135m] [--text FILE] [--windows 40]

The default other text is bench/texts/alice.txt: Lewis Carroll's "Alice's Adventures in Wonderland" (1865, public
domain), the body of Project Gutenberg eBook #11 without the Gutenberg header and licence; 19 windows long. Each file
gets one JSON line in bench/results/text-shift.jsonl with both texts' ratios and their sha256.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.quality import (RESULTS, eval_windows, file_sha256, fp_perplexity, git_commit, machine,  # noqa: E402
                           perplexity, test_text)
from converter.sources import open_source  # noqa: E402
from converter.torch_model import load_nq  # noqa: E402
from nqfmt import open_nq  # noqa: E402

OTHER_TEXT = ROOT / "bench" / "texts" / "alice.txt"


def ratios(nq: Path, model_name: str, texts: dict[str, Path], windows: int) -> dict:
    """Perplexity of the file and of its source model in full precision on each text's windows."""
    source = open_source(model_name)
    model = load_nq(nq)
    out = {}
    for name, text in texts.items():
        w = eval_windows(source, text, windows)
        fp = fp_perplexity(Path(model_name).name, source, w, text)["ppl"]
        q = perplexity(model, w)
        out[name] = {"text": str(text.relative_to(ROOT) if text.is_relative_to(ROOT) else text),
                     "sha256": file_sha256(text), "windows": len(w), "ppl_fp32": fp, "ppl_quantized": q,
                     "ppl_ratio": q / fp}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nq", nargs="+", type=Path)
    ap.add_argument("--model", default="smollm2-135m", help="the files' source model")
    ap.add_argument("--text", type=Path, default=OTHER_TEXT)
    ap.add_argument("--windows", type=int, default=40)
    args = ap.parse_args()
    for nq in args.nq:
        rec = {"file": nq.name, "commit": git_commit(), "machine": machine(), "load_average": os.getloadavg(),
               "recipe": json.loads(open_nq(nq).provenance.recipe),
               **ratios(nq, args.model, {"test": test_text(), "other": args.text}, args.windows)}
        with open(RESULTS / "text-shift.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: rec[k] for k in ("file", "test", "other")}, indent=1))


if __name__ == "__main__":
    main()
