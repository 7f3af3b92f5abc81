"""Model-reconstruction probe: start from a `.nq` file converted with --no-model-recon, run only the scale-only KL
distillation with the given settings, and measure perplexity by clarifications §7 — so the distillation's recipe can
be tuned without re-running the block stage (~18 min) each time.

    PYTHONPATH=. nice python bench/recon_probe.py FILE.nq --samples 128 --epochs 1 2 --batch 1 --lr 5e-3 2e-2

The calibration windows are drawn exactly as `nqconvert` draws them (default text, seed, seqlen); the teacher cache
is built from the full-precision source model. Every (epochs, lr) pair of the grid starts again from the file; one JSON line per pair is appended to
bench/results/recon-probe.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import (
    RESULTS,
    eval_windows,
    fp_perplexity,
    git_commit,
    machine,
    perplexity,
    test_text,
)
from converter.block_reconstruction import block_outputs, factored_linears, native_bf16
from converter.calibration import calibration_tokens, calibration_windows, default_calibration_text
from converter.generate import write_windows
from converter.torch_model import TorchModel, load_nq
from converter.model_reconstruction import reconstruct, teacher_cache
from converter.sources import open_source


def fp_trajectory(model: TorchModel, windows: torch.Tensor, every: int,
                  batch: int = 8) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The full-precision trajectory's last hidden states (what the pipeline feeds the teacher cache), and its states
    (bfloat16) after every `every`-th block, by block, for the hidden-state term (none when `every` is 0)."""
    h = block_outputs(model.embed, windows, batch)
    kept = {}
    for layer, blk in enumerate(model.blocks):
        h = block_outputs(blk, h, batch)
        if every and (layer + 1) % every == 0:
            kept[layer] = h.to(torch.bfloat16)
    return h, kept


def region_windows(tokens: list[int], samples: int, seqlen: int, shifted: bool) -> torch.Tensor:
    """Windows cut from the start of the token stream instead of drawn: `samples` consecutive windows, or with
    `shifted` half as many plus the windows between them, offset by seqlen/2 — the same tokens in new contexts.
    Comparing the two at equal steps says whether shifted windows are worth what fresh ones are once a text is used
    up (`standard` distils on 2000 of its 2009 windows)."""
    n = samples // 2 if shifted else samples
    ids = torch.tensor(tokens[:n * seqlen], dtype=torch.int64)
    base = ids.view(n, seqlen)
    if not shifted:
        return base
    half = seqlen // 2
    between = ids[half:half + (n - 1) * seqlen].view(n - 1, seqlen)
    return torch.cat([base, between])


def with_generated(model: TorchModel, real: torch.Tensor, prompt: int, temperature: float, seed: int) -> torch.Tensor:
    """The real windows, then as many windows the full-precision model writes itself, each continuing the first
    `prompt` tokens of one real window: whether the teacher's own text is worth what fresh text is, once the text
    is used up."""
    writer = copy.deepcopy(model).to(torch.bfloat16) if native_bf16() else model  # .to() is in place
    fake = write_windows(writer, real, real.shape[0], prompt, seed, temperature)
    return torch.cat([real, fake])


def add_unit_mid(model: TorchModel) -> None:
    """A scale_mid of ones on every path that has none: the same function, one more trainable vector per path."""
    for blk in model.blocks:
        for lin in factored_linears(blk):
            for p in lin.paths:
                if p.scale_mid is None:
                    p.scale_mid = torch.nn.Parameter(torch.ones(p.rank))


def thaw_signs(model: TorchModel) -> None:
    """Every linear's frozen signs become trainable latents again (`BinaryFactoredLinear.thaw_signs`)."""
    for blk in model.blocks:
        for lin in factored_linears(blk):
            lin.thaw_signs()


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
    ap.add_argument("--lr", type=float, nargs="+", default=[2e-2])
    ap.add_argument("--add-mid", action="store_true",
                    help="give every path a trainable scale_mid of ones first (probes per-rank scales)")
    ap.add_argument("--latent-lr", type=float, nargs="+", default=[0.0],
                    help="also train the signs (STE latents started at ±1) at these lrs; 0 = scales only")
    ap.add_argument("--head-lr", type=float, nargs="+", default=[0.0],
                    help="also train the final norm and the (tied) head at these lrs × mean |value|; 0 = off")
    ap.add_argument("--ce-weight", type=float, nargs="+", default=[0.0],
                    help="add this × the next-token cross-entropy on the calibration text to the KL loss; 0 = off")
    ap.add_argument("--hidden-weight", type=float, nargs="+", default=[0.0],
                    help="add this × the unit-RMS hidden-state distance to the teacher's, averaged over the watched "
                         "block outputs; 0 = off")
    ap.add_argument("--hidden-every", type=int, default=1, help="watch the output of every k-th block")
    ap.add_argument("--layout", choices=["drawn", "region", "shifted", "generated"], default="drawn",
                    help="drawn: the windows nqconvert draws; region: the first `samples` windows of the text; "
                         "shifted: half as many, plus the half-offset windows between them; generated: half as "
                         "many, plus as many the full-precision model writes from their first --prompt tokens")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens of a generated window")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of generated windows")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40)
    args = ap.parse_args()

    source = open_source(args.model)
    tok = source.hf_tokenizer()
    if args.layout == "drawn":
        calib = calibration_windows(tok, [default_calibration_text()], max(args.calib_samples, args.samples),
                                    args.seqlen, args.seed)[:args.samples]
    else:
        calib = region_windows(calibration_tokens(tok, [default_calibration_text()]),
                               args.samples // 2 if args.layout == "generated" else args.samples, args.seqlen,
                               args.layout == "shifted")
    t0 = time.perf_counter()
    with torch.no_grad():
        fp = TorchModel.from_source(source)
        if args.layout == "generated":
            calib = with_generated(fp, calib, args.prompt, args.temperature, args.seed)
            print(f"generated {calib.shape[0] // 2} windows in {time.perf_counter() - t0:.0f} s", flush=True)
            print(tok.decode(calib[calib.shape[0] // 2].tolist()), flush=True)
        last, hidden = fp_trajectory(fp, calib, args.hidden_every if max(args.hidden_weight) > 0 else 0)
        cache = teacher_cache(fp.head, last, args.top_k, 1)
        del last
    del fp
    t_cache = time.perf_counter() - t0
    text = test_text()
    windows = eval_windows(source, text, args.windows)
    fp_ppl = fp_perplexity(Path(args.model).name, source, windows, text)["ppl"]
    for epochs in args.epochs:
        for lr, latent_lr, head_lr, ce, hw in itertools.product(args.lr, args.latent_lr, args.head_lr,
                                                                args.ce_weight, args.hidden_weight):
            model = load_nq(args.nq)
            if args.add_mid:
                add_unit_mid(model)
            if latent_lr > 0:
                thaw_signs(model)
            losses: list[float] = []
            t1 = time.perf_counter()
            last = reconstruct(model, calib, cache, epochs, args.batch, lr, 12345,
                               lambda step, steps, loss, out=losses: out.append(loss), latent_lr, head_lr, ce,
                               hidden, hw)
            t_recon = time.perf_counter() - t1
            ppl = perplexity(model, windows)
            tenth = max(len(losses) // 10, 1)
            settings = vars(args) | {"nq": str(args.nq), "epochs": epochs, "lr": lr, "latent_lr": latent_lr,
                                    "head_lr": head_lr, "ce_weight": ce, "hidden_weight": hw,
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
