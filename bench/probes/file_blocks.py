"""Where a finished file's loss sits, block by block: each quantized block swapped alone into the full-precision model.

    nice python bench/probes/file_blocks.py FILE.nq [FILE.nq ...] [--windows 2] [--model smollm2-135m]

For every file, on the first `windows` test windows of spec/EVALUATION.md §2 (2048 tokens each), against the
full-precision model's next-token distributions:
- `alone[i]`: mean KL(full precision ‖ model) per token when only block i is the file's (every other block, the
  embedding and the head full precision);
- `local[i]`: ‖B̂ᵢ(hᵢ) − Bᵢ(hᵢ)‖² / ‖Bᵢ(hᵢ) − hᵢ‖², the file's block on the full-precision trajectory's input, its
  output error relative to what the block adds to the residual;
- `table`: the KL with only the file's embedding and head; `all`: the KL of the whole file.
The sum of `alone` against `all` shows how far the blocks' errors compound (or, after model-wide distillation, cancel).
One JSON line per file is appended to bench/results/file-blocks.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.quality import RESULTS, eval_windows, git_commit, machine, test_text  # noqa: E402
from converter.sources import open_source  # noqa: E402
from converter.torch_model import TorchModel, load_nq  # noqa: E402


def kl_per_token(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(reference) ‖ softmax(logits)), in float64."""
    p = F.log_softmax(reference.double(), -1)
    q = F.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@torch.no_grad()
def probe(fp: TorchModel, nq: TorchModel, windows: torch.Tensor) -> dict:
    """`alone`, `local`, `table` and `all` of the module docstring, one window at a time."""
    n = len(fp.blocks)
    alone, local = [0.0] * n, [0.0] * n
    table = whole = 0.0
    for w in windows:
        tokens = w[None]
        h = fp.embed(tokens)
        trajectory = [h]
        for blk in fp.blocks:
            trajectory.append(blk(trajectory[-1]))
        reference = fp.head(trajectory[-1])
        for i, blk in enumerate(nq.blocks):
            out = blk(trajectory[i])
            added = trajectory[i + 1] - trajectory[i]
            local[i] += float((out - trajectory[i + 1]).double().pow(2).sum() / added.double().pow(2).sum())
            for later in fp.blocks[i + 1:]:
                out = later(out)
            alone[i] += kl_per_token(reference, fp.head(out))
        h = nq.embed(tokens)
        for blk in fp.blocks:
            h = blk(h)
        table += kl_per_token(reference, nq.head(h))
        whole += kl_per_token(reference, nq(tokens))
    k = len(windows)
    return dict(alone=[a / k for a in alone], local=[v / k for v in local], table=table / k, all=whole / k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nq", type=Path, nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=2)
    args = ap.parse_args()
    source = open_source(args.model)
    windows = eval_windows(source, test_text(), args.windows)
    fp = TorchModel.from_source(source).eval()
    for path in args.nq:
        t0 = time.perf_counter()
        result = probe(fp, load_nq(path).eval(), windows)
        record = {"commit": git_commit(), "machine": machine(), "load_average": os.getloadavg(), "file": path.name,
                  "model": args.model, "windows": len(windows), "seconds": time.perf_counter() - t0,
                  "sum_alone": sum(result["alone"]), **result}
        with open(RESULTS / "file-blocks.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{path.name}: all {result['all']:.4f}, sum of alone {record['sum_alone']:.4f}, table {result['table']:.4f}",
              flush=True)
        print("  alone " + " ".join(f"{a:.4f}" for a in result["alone"]), flush=True)
        print("  local " + " ".join(f"{v:.3f}" for v in result["local"]), flush=True)


if __name__ == "__main__":
    main()
