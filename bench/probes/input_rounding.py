"""What rounding the linears' inputs costs: the full-precision model with every decoder linear's input rounded per
block of 32 to ±(2^(b−1) − 1)·absmax (b = 8: the int8 head's rule; b = 11: the fixed-point kernels' rule,
runtime/backends/numba_fixed.py), perplexity by the protocol of spec/EVALUATION.md §2 on the same windows.

    nice python bench/probes/input_rounding.py [--model smollm2-135m] [--windows 40] [--bits 11 8]

A `.nq` file's binary linears have two stages, each of whose inputs the kernels round; the dense model here has one
per linear, so this measures the rounding of one stage per linear on the model the file approximates. One JSON line
per run in bench/results/input-rounding.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.quality import RESULTS, eval_windows, file_sha256, git_commit, machine, perplexity, test_text  # noqa: E402
from converter.sources import open_source  # noqa: E402
from converter.torch_model import TorchModel  # noqa: E402

BLOCK = 32


def rounded(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x with each block of 32 along the last axis rounded to integers of at most 2^(bits−1) − 1 times absmax."""
    top = float(2 ** (bits - 1) - 1)
    blocks = x.reshape(*x.shape[:-1], -1, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    return (torch.round(blocks / scale) * scale).reshape(x.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--bits", type=int, nargs="+", default=[11, 8])
    a = ap.parse_args()
    source = open_source(a.model)
    text = test_text()
    windows = eval_windows(source, text, a.windows)
    model = TorchModel.from_source(source).eval()
    linears = [lin for block in model.blocks for lin in block.linears.values()]
    assert all(lin.in_features % BLOCK == 0 for lin in linears)
    record = {"model": a.model, "text_sha256": file_sha256(text), "windows": len(windows), "commit": git_commit(),
              "machine": machine(), "load_average_before": os.getloadavg(), "ppl": {}}
    for bits in [None, *a.bits]:
        hooks = [] if bits is None else [lin.register_forward_pre_hook(lambda _m, args, b=bits: (rounded(args[0], b),))
                                         for lin in linears]
        start = time.perf_counter()
        ppl = perplexity(model, windows)
        for h in hooks:
            h.remove()
        key = "float32" if bits is None else f"{bits}-bit"
        record["ppl"][key] = ppl
        print(f"{key}: ppl {ppl:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    base = record["ppl"]["float32"]
    record["change_percent"] = {k: 100 * (v / base - 1) for k, v in record["ppl"].items() if k != "float32"}
    print(json.dumps(record["change_percent"]))
    with open(RESULTS / "input-rounding.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
