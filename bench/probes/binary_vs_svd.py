"""How much a binary rank is worth: LB-ADMM's error on real weights at several ranks, one path and two residual
paths, against the best continuous approximation's (the SVD tail), as the continuous rank that errs as much.

    nice python bench/probes/binary_vs_svd.py [--iterations 40]

The rank allocation's error estimate (converter/allocation.py, `effective_rank`) is fitted to these records. One
JSON line per (linear, rank) is appended to bench/results/binary-vs-svd.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.quality import RESULTS, git_commit  # noqa: E402
from converter.admm import AdmmSettings, lb_admm  # noqa: E402
from converter.allocation import effective_rank  # noqa: E402
from converter.sources import open_source  # noqa: E402

LINEARS = [(5, "attn_q"), (5, "ffn_gate"), (5, "attn_k"), (0, "ffn_down")]
RANKS = (64, 128, 256, 384, 576)


def equivalent_rank(tail: torch.Tensor, total: float, error: float) -> int:
    """The smallest continuous rank whose best approximation errs no more than `error` (relative)."""
    return int((tail / total > error).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=40)
    args = ap.parse_args()
    source = open_source("smollm2-135m")
    settings = AdmmSettings(iterations=args.iterations)
    for layer, name in LINEARS:
        w = source.block_weights(layer)[f"{name}.weight"].float()
        energy = torch.linalg.svdvals(w.double()).pow(2)
        tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
        total = float(energy.sum())
        for r in (r for r in RANKS if r <= min(w.shape)):
            first = lb_admm(w, r, settings=settings)
            residual = w - first.deployed()
            second = lb_admm(residual, r, settings=settings, seed=1)
            one = float((residual.double()).pow(2).sum()) / total
            two = float((residual - second.deployed()).double().pow(2).sum()) / total
            rec = dict(commit=git_commit(), layer=layer, linear=name, shape=list(w.shape), rank=r,
                       iterations=args.iterations, one_path_rel_error=one, two_paths_rel_error=two,
                       svd_rel_error=float(tail[r]) / total,
                       one_path_equivalent_rank=equivalent_rank(tail, total, one),
                       two_paths_equivalent_rank=equivalent_rank(tail, total, two),
                       model_one_path=float(effective_rank(torch.tensor(r), *w.shape)),
                       model_two_paths=float(effective_rank(torch.tensor(2 * r), *w.shape)),
                       load_average=os.getloadavg())
            with open(RESULTS / "binary-vs-svd.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
