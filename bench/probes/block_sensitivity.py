"""Which blocks the loss comes from: for a `.nq` file, the perplexity with one block quantized and the rest at full
precision, and with every block quantized but one put back to full precision.

    nice python bench/probes/block_sensitivity.py FILE.nq [--windows 4]

A few blocks that carry most of the loss would argue for spending refinement steps where they matter (the presets
give every block the same); a flat map would not. The windows are spec/EVALUATION.md §2's (2048 tokens, no BOS), the
first `--windows` of the test text. One JSON line per file is appended to bench/results/block-sensitivity.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.quality import RESULTS, eval_windows, git_commit, machine, perplexity, test_text  # noqa: E402
from converter.torch_model import TorchModel, load_nq  # noqa: E402
from converter.sources import open_source  # noqa: E402


def swapped(base: TorchModel, other: TorchModel, layer: int) -> TorchModel:
    """`base` with block `layer` taken from `other` (the modules are shared, not copied: evaluation only)."""
    blocks = list(base.blocks)
    blocks[layer] = other.blocks[layer]
    return TorchModel(base.config, base.token_embd.detach(), blocks, base.output_norm.weight.detach(),
                      None if base.output is None else base.output.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nq", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    source = open_source(args.model)
    windows = eval_windows(source, test_text(), args.windows)
    fp, q = TorchModel.from_source(source), load_nq(args.nq)
    t0 = time.perf_counter()
    with torch.no_grad():
        fp_ppl, q_ppl = perplexity(fp, windows), perplexity(q, windows)
        alone = [perplexity(swapped(fp, q, i), windows) / fp_ppl for i in range(len(fp.blocks))]
        restored = [perplexity(swapped(q, fp, i), windows) / fp_ppl for i in range(len(fp.blocks))]
    record = {"commit": git_commit(), "machine": machine(), "nq": str(args.nq), "windows": args.windows,
              "seconds": time.perf_counter() - t0, "ppl_fp32": fp_ppl, "ratio_all": q_ppl / fp_ppl,
              "ratio_only_block": alone, "ratio_all_but_block": restored}
    with open(RESULTS / "block-sensitivity.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"all blocks quantized: {q_ppl / fp_ppl:.3f}×  (FP ppl {fp_ppl:.2f}, {args.windows} windows)")
    print("block  only-this-one  all-but-this-one  log-share")
    total = math.log(q_ppl / fp_ppl)
    for i, (a, r) in enumerate(zip(alone, restored)):
        print(f"{i:5d}  {a:13.3f}  {r:16.3f}  {1 - math.log(r) / total:9.3f}")


if __name__ == "__main__":
    main()
