"""Block-stage probe: quantize only N consecutive blocks of the default model (the first N unless --start) with a
variant of the quick recipe (the rest stay full precision) and measure perplexity on a few test windows — minutes
per variant instead of a whole conversion, so the block stage's settings can be compared side by side.

    nice python bench/probes/block_probe.py --blocks 4 base epochs=8 dout=0 samples=256,epochs=2

Each positional argument is a variant: comma-separated overrides of epochs, batch, lr, scale_lr, samples, admm
(iterations), mitigation (0/1), dout (0/1: output-side preconditioner), din (0/1), cw (0/1: channel-weighted loss),
seqlen (tuning window length; the preconditioner statistics stay on quick's windows),
shrink (the preconditioners' shrinkage γ in percent, e.g. shrink=20 for γ = 0.2; statistics recomputed),
first (refinement epochs of block 0 alone, which costs the most when quantized: bench/block_sensitivity.py),
kl (the model's last kl blocks tune against the next-token distribution through the full-precision blocks after
them and the head, block_reconstruction.output_kl; `--start 28 --blocks 1 kl=2` probes block 28 alone under it; records with
rbf16=1 ran the student's readout in bfloat16, which is now always so where the teacher is);
"base" is the quick preset unchanged. One JSON line per variant is appended to bench/results/block-probe.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.quality import RESULTS, eval_windows, git_commit, machine, perplexity, test_text
from converter import block_reconstruction as B
from converter.admm import AdmmSettings
from converter.calibration import calibration_tokens, default_calibration_texts, draw_windows
from converter.preconditioners import LayerPreconditioners, collect_preconditioners
from converter.torch_model import DecoderBlock, TorchModel
from converter.pipeline import PRESETS, skeleton
from converter.sources import open_source

DEFAULTS = {"epochs": None, "batch": None, "lr": None, "scale_lr": None, "samples": None, "admm": None,
            "mitigation": 1, "dout": 1, "din": 1, "cw": 1, "seqlen": None, "shrink": None, "first": None,
            "kl": 0}


def parse_variant(text: str) -> dict:
    """'epochs=8,dout=0' → overrides; unknown keys are an error (a typo must not silently probe the baseline)."""
    out = dict(DEFAULTS)
    if text == "base":
        return out
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in DEFAULTS or not value:
            raise SystemExit(f"bad variant item {item!r}; keys: {', '.join(DEFAULTS)}")
        out[key] = float(value) if key in ("lr", "scale_lr") else int(value)
    return out


def ones_where(imp: LayerPreconditioners, v: dict) -> LayerPreconditioners:
    """The layer's preconditioners with the switched-off ones replaced by 1."""
    keep = lambda d, on: {k: (x if on else torch.ones_like(x)) for k, x in d.items()}  # noqa: E731
    cw = imp.channel_weight if v["cw"] else torch.ones_like(imp.channel_weight)
    return LayerPreconditioners(keep(imp.d_in, v["din"]), keep(imp.d_out, v["dout"]), cw, imp.fisher_scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--start", type=int, default=0, help="first quantized block; those before it stay FP")
    ap.add_argument("--windows", type=int, default=4, help="2048-token test windows for perplexity")
    ap.add_argument("--bits", type=float, default=1.0)
    args = ap.parse_args()
    variants = [(name, parse_variant(name)) for name in args.variants]

    recipe = PRESETS["quick"]
    teacher_bf16 = recipe.teacher_bf16 and B.native_bf16()  # the targets' precision, as the pipeline picks it
    src = open_source("smollm2-135m")
    c = src.config
    ids = calibration_tokens(src.hf_tokenizer(), default_calibration_texts())
    win = draw_windows(ids, recipe.stat_samples, recipe.seqlen, 0)
    base = skeleton(src)
    stats_by_shrink: dict[float, list[LayerPreconditioners]] = {}

    def stats(shrinkage: float) -> list[LayerPreconditioners]:
        """The preconditioners at this shrinkage, computed once per γ (they cost a forward and backward pass)."""
        if shrinkage not in stats_by_shrink:
            stats_by_shrink[shrinkage] = collect_preconditioners(
                c, base, lambda i: DecoderBlock(c, i, src.block_weights(i)), win, shrinkage, recipe.forward_batch, None)
        return stats_by_shrink[shrinkage]

    ev = eval_windows(src, test_text(), args.windows)
    fp_blocks = [DecoderBlock(c, i, src.block_weights(i)) for i in range(c.n_layers)]

    def ppl(blocks: list) -> float:
        return perplexity(TorchModel(c, base.token_embd, blocks, base.output_norm.weight, None), ev)

    fp_ppl = ppl(fp_blocks)
    for name, v in variants:
        t = time.perf_counter()
        refine = dataclasses.replace(recipe.refinement, **{k: v[k] for k in ("epochs", "batch", "lr", "scale_lr")
                                                           if v[k] is not None})
        admm = AdmmSettings(iterations=v["admm"]) if v["admm"] else recipe.admm
        samples = v["samples"] or recipe.samples
        tune_win = draw_windows(ids, samples, v["seqlen"] or recipe.seqlen, 0)
        fp_in = B.block_outputs(base.embed, tune_win, 8)
        for layer in range(args.start):
            fp_in = B.block_outputs(fp_blocks[layer], fp_in, 8, teacher_bf16)
        q_in = fp_in.clone()
        qblocks, loss = [], float("nan")
        layer_stats = stats(recipe.shrinkage if v["shrink"] is None else v["shrink"] / 100)
        for layer in range(args.start, args.start + args.blocks):
            blk = DecoderBlock(c, layer, src.block_weights(layer))
            imp = ones_where(layer_stats[layer], v)
            targets = B.block_outputs(blk, fp_in, 8, teacher_bf16)
            objective = B.block_objective(layer, c.n_layers, targets, imp.channel_weight, base.head,
                                          fp_blocks.__getitem__, v["kl"], teacher_bf16)
            if v["mitigation"]:
                B.mitigate_errors(blk, q_in, objective, recipe.mitigation, B.stage_seed(0, layer, 1), lambda *a: None)
            B.factorize(blk, B.block_ranks(c, args.bits), imp, admm, 0)
            tune = dataclasses.replace(refine, epochs=v["first"]) if layer == 0 and v["first"] else refine
            if tune.epochs:
                loss = B.refine(blk, q_in, objective, tune, B.stage_seed(0, layer, 2), lambda *a: None)
            B.freeze(blk)
            q_in, fp_in = B.block_outputs(blk, q_in, 8), targets
            qblocks.append(blk)
        record = {"commit": git_commit(), "machine": machine(), "load_average": os.getloadavg(), "variant": name,
                  "settings": v, "start": args.start, "blocks": args.blocks, "windows": args.windows,
                  "bits": args.bits, "teacher_bf16": teacher_bf16, "ppl_fp32": fp_ppl,
                  "ppl": ppl(fp_blocks[:args.start] + qblocks + fp_blocks[args.start + args.blocks:]),
                  "last_block_loss": loss,
                  "seconds": time.perf_counter() - t}
        with open(RESULTS / "block-probe.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
