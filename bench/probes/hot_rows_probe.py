"""Where a 4-bit embedding/head loses, and whether keeping its most frequent rows at 8 bits buys it back: the
full-precision model with only its tied table replaced, perplexity on the first test windows.

    nice python bench/probes/hot_rows_probe.py [--hot 0 1024 4096 8192] [--windows 4] [--cold iq4_nl]

The table's rows are ranked by how often their token occurs in the whole calibration text; the `K`
most frequent keep the source's Q8_0 values, the rest are stored as `--cold` (converter/embedding.py's weighted
4-bit search, column weights from the statistics windows). For each K one JSON line goes to
bench/results/hot-rows-probe.jsonl: the table's bytes (K rows at Q8_0, V − K at 4.5 bits, a 4-byte id per hot row),
the share of calibration and test tokens the hot rows cover, perplexity and its ratio to full precision.
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

from bench.quality import RESULTS, eval_windows, git_commit, machine, perplexity, test_text  # noqa: E402
from converter import embedding as E  # noqa: E402
from converter.calibration import calibration_tokens, calibration_windows, default_calibration_texts  # noqa: E402
from converter.pipeline import PRESETS  # noqa: E402
from converter.sources import open_source  # noqa: E402
from converter.torch_model import TorchModel  # noqa: E402
from nqfmt import keys as K  # noqa: E402
from nqfmt.q4 import dequantize_q4  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hot", type=int, nargs="+", default=[0, 1024, 4096, 8192])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--cold", default="iq4_nl", choices=["q4_0", "iq4_nl"])
    args = ap.parse_args()
    recipe = PRESETS["quick"]
    source = open_source(args.model)
    config = source.config
    fp = TorchModel.from_source(source)
    evaluation = eval_windows(source, test_text(), args.windows)
    calib = calibration_windows(source.hf_tokenizer(), default_calibration_texts(), recipe.samples, recipe.seqlen, 0)
    with torch.no_grad():
        final = E.final_hidden(fp.embed, lambda i: fp.blocks[i], config.n_layers, calib[:recipe.stat_samples],
                               recipe.forward_batch, False)
    cols = E.column_weights(fp.output_norm, final, recipe.shrinkage)
    w = fp.token_embd.detach().to(torch.float32)
    gtype = E.DENSE[args.cold]
    cold = torch.from_numpy(dequantize_q4(E.quantize_q4(w, cols, gtype), gtype).reshape(w.shape))
    tokens = torch.as_tensor(calibration_tokens(source.hf_tokenizer(), default_calibration_texts()))
    counts = torch.bincount(tokens.reshape(-1), minlength=config.vocab)[:config.vocab]
    test_counts = torch.bincount(evaluation.reshape(-1), minlength=config.vocab)[:config.vocab]
    order = torch.argsort(counts, descending=True, stable=True)
    fp_ppl = perplexity(fp, evaluation)
    q8_bytes, q4_bytes = (K.TYPE_SIZES[t][1] * config.hidden // K.TYPE_SIZES[t][0] for t in (K.GGMLType.Q8_0, gtype))
    for hot in args.hot:
        ids = order[:hot]
        table = cold.clone()
        table[ids] = w[ids]  # the source's table is Q8_0: its values are what a Q8_0 row stores
        with torch.no_grad():
            model = TorchModel(config, table, list(fp.blocks), fp.output_norm.weight.detach(), None
                               if config.tie_embeddings else fp.output.detach())
            ppl = perplexity(model, evaluation)
        record = {"commit": git_commit(), "machine": machine(), "load_average": os.getloadavg(), "model": args.model,
                  "windows": len(evaluation), "cold": args.cold, "hot_rows": hot,
                  "table_bytes": hot * (q8_bytes + 4) + (config.vocab - hot) * q4_bytes,
                  "calibration_share": float(counts[ids].sum() / counts.sum()),
                  "test_share": float(test_counts[ids].sum() / test_counts.sum()),
                  "ppl_fp32": fp_ppl, "ppl": ppl, "ratio": ppl / fp_ppl}
        with open(RESULTS / "hot-rows-probe.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"hot {hot:6d}: {record['table_bytes'] / 1e6:6.2f} MB, covers {record['calibration_share']:.3f} of "
              f"calibration / {record['test_share']:.3f} of test tokens, ppl {ppl:.3f} ({ppl / fp_ppl:.4f}×)",
              flush=True)


if __name__ == "__main__":
    main()
