"""The runtime's tokenizer (the file's embedded tokenizer.json through `tokenizers`) against the tokenizer
transformers builds from the default model's GGUF (which tokenized the project's baseline; clarifications §8):
identical ids on sample texts, digits and non-ASCII included, and on a slice of the test text.

Usage: python -m bench.tokenizer_agreement FILE.nq [--gguf Q4_1.gguf] [--chars 200000]
Writes bench/results/tokenizer-agreement-<file stem>.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nqfmt import open_nq
from runtime.tokenizer import Tokenizer

from .speed import ROOT, commit, original_q4_1

SAMPLES = ["The capital of France is Paris.", "In 1987, 3.14159 × 2 = 6.28318; 1,234,567 people.",
           "naïve café – Ünïcödé “quotes” — 東京 ☃ 🙂", "  leading spaces\tand\ttabs\n\nnew lines  ",
           "<|im_start|>user\nHi<|im_end|>\n", "don't won't it's 'quoted' \"double\"", "x" * 50 + " 00000000001"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--text", type=Path, default=Path("/work/shared/data/enwiki-test.txt"))
    ap.add_argument("--chars", type=int, default=200_000)
    a = ap.parse_args()
    from transformers import AutoTokenizer
    gguf = a.gguf or original_q4_1()
    theirs = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = Tokenizer(open_nq(a.file).tokenizer)
    texts = SAMPLES + [a.text.read_text(encoding="utf-8")[:a.chars]]
    rows = []
    for t in texts:
        mine, ref = ours.encode(t, add_bos=False), theirs.encode(t, add_special_tokens=False)
        rows.append(dict(chars=len(t), tokens=len(ref), identical=mine == ref,
                         first_difference=next((i for i, (x, y) in enumerate(zip(mine, ref)) if x != y), None)))
    res = dict(commit=commit(), file=str(a.file), gguf=str(gguf), all_identical=all(r["identical"] for r in rows),
               texts=rows)
    path = ROOT / "bench" / "results" / f"tokenizer-agreement-{a.file.stem}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"identical ids on all {len(rows)} texts: {res['all_identical']} "
          f"({sum(r['tokens'] for r in rows)} tokens)")
    print(path)


if __name__ == "__main__":
    main()
