"""Model-reconstruction probe: start from a `.nq` file converted with --no-model-recon, run only the scale-only
distillation with the given settings, and measure perplexity by spec/EVALUATION.md §2 — so the distillation's recipe
can be tuned without re-running the block stage each time.

    nice python bench/probes/recon_probe.py FILE.nq --samples 128 --epochs 1 2 --batch 1 --lr 5e-3 2e-2

The calibration windows are drawn exactly as `nqconvert` draws them (default text, seed, seqlen); the teacher cache
is built from the full-precision source model. Every (epochs, lr, ce_weight) of the grid starts again from the file;
one JSON line each is appended to bench/results/recon-probe.jsonl. Records with keys this probe no longer has
(layouts, written windows, latent/head/hidden-state terms) came from its version at commit 6016245.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.quality import RESULTS, eval_windows, fp_perplexity, git_commit, machine, perplexity, test_text  # noqa: E402
from converter.block_reconstruction import block_outputs  # noqa: E402
from converter.calibration import calibration_windows, default_calibration_texts  # noqa: E402
from converter.model_reconstruction import reconstruct, teacher_cache  # noqa: E402
from converter.sources import open_source  # noqa: E402
from converter.torch_model import TorchModel, load_nq  # noqa: E402


def last_hidden(model: TorchModel, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """The full-precision trajectory's last hidden states: what the pipeline feeds the teacher cache."""
    h = block_outputs(model.embed, windows, batch)
    for blk in model.blocks:
        h = block_outputs(blk, h, batch)
    return h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nq", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=128, help="windows the conversion drew")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=128, help="windows used for distillation")
    ap.add_argument("--epochs", type=float, nargs="+", default=[1.0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, nargs="+", default=[5e-3])
    ap.add_argument("--ce-weight", type=float, nargs="+", default=[1.0],
                    help="add this × the next-token cross-entropy on the calibration text to the KL loss; 0 = off")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40)
    args = ap.parse_args()

    source = open_source(args.model)
    calib = calibration_windows(source.hf_tokenizer(), default_calibration_texts(),
                                max(args.calib_samples, args.samples), args.seqlen, args.seed)[:args.samples]
    t0 = time.perf_counter()
    with torch.no_grad():
        fp = TorchModel.from_source(source)
        cache = teacher_cache(fp.head, last_hidden(fp, calib), args.top_k, 1)
    del fp
    t_cache = time.perf_counter() - t0
    text = test_text()
    windows = eval_windows(source, text, args.windows)
    fp_ppl = fp_perplexity(Path(args.model).name, source, windows, text)["ppl"]
    for epochs, lr, ce in itertools.product(args.epochs, args.lr, args.ce_weight):
        model = load_nq(args.nq)
        losses: list[float] = []
        t1 = time.perf_counter()
        last = reconstruct(model, calib, cache, epochs, args.batch, lr, 12345,
                           lambda step, steps, loss, out=losses: out.append(loss), ce_weight=ce)
        t_recon = time.perf_counter() - t1
        ppl = perplexity(model, windows)
        tenth = max(len(losses) // 10, 1)
        settings = vars(args) | {"nq": str(args.nq), "epochs": epochs, "lr": lr, "ce_weight": ce,
                                "distill_windows": calib.shape[0]}
        record = {"commit": git_commit(), "machine": machine(), "load_average": os.getloadavg(),
                  "settings": settings, "cache_seconds": t_cache, "recon_seconds": t_recon,
                  "loss_first_tenth": sum(losses[:tenth]) / tenth, "loss_last_epoch": last,
                  "ppl_fp32": fp_ppl, "ppl_quantized": ppl, "ppl_ratio": ppl / fp_ppl}
        with open(RESULTS / "recon-probe.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
