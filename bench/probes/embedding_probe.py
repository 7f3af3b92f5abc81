"""What each way of storing the embedding and head costs on its own: the full-precision model with only its table
stored as `--embedding` would store it (converter/embedding.py, before any distillation), perplexity on the first
test windows.

    nice python bench/probes/embedding_probe.py [--choices f16 q8_0 q4_0 binary binary:256] [--windows 4]
        [--tune-lr 5e-3 1e-3]

The column and row weights come from the quick preset's statistics windows (the first 32 of its calibration draw)
and its 128 block windows' token counts, the ADMM from its 60 iterations. One JSON line per choice is appended to
bench/results/embedding-probe.jsonl: table bits per entry, whole-file bytes it would add, the weighted relative
error of the table, perplexity and its ratio to full precision on the same windows. With `--tune-lr`, a factored table's
scale vectors are then distilled alone (a 4-bit table's block scales stay as stored: spec/CONVERTER.md), the blocks at full precision,
as model reconstruction would (KL on the top-64 + tail, + 1.0 · CE, the 128 windows × 1 epoch, each lr given), and
the perplexity is measured again (key `tuned`).
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

from bench.quality import RESULTS, eval_windows, git_commit, machine, perplexity, test_text  # noqa: E402
from converter import embedding as E  # noqa: E402
from converter.calibration import calibration_tokens, calibration_windows, default_calibration_texts  # noqa: E402
from converter.factored import BinaryFactoredLinear  # noqa: E402
from converter.model_reconstruction import reconstruct, teacher_cache  # noqa: E402
from converter.pipeline import PRESETS  # noqa: E402
from converter.sources import open_source  # noqa: E402
from converter.torch_model import TorchModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--choices", nargs="+", default=["f16", "q8_0", "q4_0", "binary"])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--tune-lr", type=float, nargs="*", default=[])
    args = ap.parse_args()
    recipe = PRESETS["quick"]
    source = open_source(args.model)
    config = source.config
    fp = TorchModel.from_source(source)
    evaluation = eval_windows(source, test_text(), args.windows)
    calib = calibration_windows(source.hf_tokenizer(), default_calibration_texts(), recipe.samples, recipe.seqlen, 0)
    with torch.no_grad():
        final = E.final_hidden(fp.embed, lambda i: fp.blocks[i], config.n_layers,
                               calib if args.tune_lr else calib[:recipe.stat_samples], recipe.forward_batch, False)
    cache = teacher_cache(fp.head, final, recipe.top_k, 1) if args.tune_lr else None
    final = final[:recipe.stat_samples]
    cols = E.column_weights(fp.output_norm, final, recipe.shrinkage)
    rows = E.row_weights(calib, config.vocab, recipe.shrinkage)
    tokens = torch.as_tensor(calibration_tokens(source.hf_tokenizer(), default_calibration_texts()))
    counts = torch.bincount(tokens, minlength=config.vocab)[:config.vocab]  # hot rows: the whole text's counts
    w = fp.token_embd.detach()
    weight = rows[:, None] * cols[None, :]
    fp_ppl = perplexity(fp, evaluation)
    for choice in args.choices:
        choice = E.resolve_embedding(E.parse_embedding(choice), config, explicit=True)
        t0 = time.perf_counter()
        stored = E.store_table(choice, w, config, cols, rows, recipe.admm, seed=0, token_counts=counts)
        seconds = time.perf_counter() - t0
        table = stored.torch_value()
        with torch.no_grad():
            dense = table.dense_weight() if isinstance(table, BinaryFactoredLinear) else table
            err = float(((w - dense) * weight).pow(2).sum() / (w * weight).pow(2).sum())
            model = TorchModel(config, table, list(fp.blocks), fp.output_norm.weight.detach(), None
                               if config.tie_embeddings else fp.output.detach())
            ppl = perplexity(model, evaluation)
        record = {"commit": git_commit(), "machine": machine(), "load_average": os.getloadavg(), "model": args.model,
                  "windows": len(evaluation), "choice": choice, "table_bits": E.table_bits(choice, config),
                  "table_bytes": sum(a.nbytes for a in stored.export("token_embd").values()),
                  "weighted_relative_error": err, "store_seconds": seconds, "ppl_fp32": fp_ppl, "ppl": ppl,
                  "ratio": ppl / fp_ppl}
        tuned = {}
        for lr in args.tune_lr if isinstance(table, torch.nn.Module) else []:
            start = [t.detach().clone() for t in table.scales()]
            t0 = time.perf_counter()
            reconstruct(model, calib, cache, 1, 1, lr, 0, lambda *a: None, ce_weight=recipe.recon_ce)
            table.round_scales_to_fp16()
            tuned[lr] = {"ppl": perplexity(model, evaluation), "seconds": time.perf_counter() - t0}
            tuned[lr]["ratio"] = tuned[lr]["ppl"] / fp_ppl
            print(f"{choice:12s} scales tuned at lr {lr:g}: ppl {tuned[lr]['ppl']:.3f} ({tuned[lr]['ratio']:.4f}×)",
                  flush=True)
            with torch.no_grad():
                for t, s in zip(table.scales(), start):
                    t.copy_(s)
        record["tuned"] = tuned
        with open(RESULTS / "embedding-probe.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{choice:12s} {record['table_bits']:6.3f} bits/entry  {record['table_bytes'] / 1e6:6.2f} MB  "
              f"weighted error {err:.4f}  ppl {ppl:.3f} ({ppl / fp_ppl:.4f}×)  stored in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
