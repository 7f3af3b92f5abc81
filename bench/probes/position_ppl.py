"""Where in the context a quantized model loses: perplexity by token position, full precision beside `.nq` files.

    nice python bench/probes/position_ppl.py FILE.nq [FILE.nq ...] [--windows 8] [--fp-linears attn_q,attn_k]
        [--q-sharpen 1.05]

The windows are those of spec/EVALUATION.md §2 (2048 tokens, no BOS; the first `--windows` of the test text). For each
position bucket the mean next-token cross-entropy is averaged over windows, and the ratio exp(CE_q − CE_fp) says how
much worse the file is there than the full-precision model. The calibration windows are 256 tokens while the test
windows are 2048, so a ratio that grows with position would point at context length. `--fp-linears` puts the named
linears of every block back to full precision (from the source model), to see which linears the loss comes from.
`--q-sharpen τ` multiplies every attention query by τ (its scale_out), i.e. divides the softmax temperature by τ: if
quantization noise in the scores flattened attention more as the context grows, some τ > 1 would help late positions.
One JSON line per file and τ is appended to bench/results/position-ppl.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.quality import RESULTS, eval_windows, git_commit, machine, test_text, token_losses  # noqa: E402
from converter.torch_model import DecoderBlock, TorchModel, load_nq  # noqa: E402
from converter.sources import open_source  # noqa: E402
from nqfmt import keys as K  # noqa: E402

EDGES = (0, 64, 256, 512, 1024, 2047)


def buckets(fp: torch.Tensor, q: torch.Tensor) -> list[dict]:
    """Per position bucket: both perplexities and their ratio."""
    rows = []
    for a, b in zip(EDGES[:-1], EDGES[1:]):
        f, g = float(fp[a:b].mean()), float(q[a:b].mean())
        rows.append({"positions": [a, b], "ppl_fp32": math.exp(f), "ppl_quantized": math.exp(g),
                     "ratio": math.exp(g - f)})
    return rows


def restore_fp(model: TorchModel, source, names: list[str]) -> None:
    """Replace the named linears of every block by the source's full-precision weights (and bias)."""
    if not names:
        return
    for i, blk in enumerate(model.blocks):
        full = DecoderBlock(source.config, i, source.block_weights(i))
        for name in names:
            blk.linears[name] = full.linears[name]


def sharpen_queries(model: TorchModel, tau: float) -> None:
    """Scale every block's attention queries by tau (all paths' scale_out of attn_q)."""
    with torch.no_grad():
        for blk in model.blocks:
            for path in blk.linears[K.ATTN_Q].paths:
                path.scale_out.mul_(tau)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nq", type=Path, nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--fp-linears", default="", help="comma-separated linears kept full precision, e.g. attn_q,attn_k")
    ap.add_argument("--q-sharpen", type=float, nargs="+", default=[1.0], help="query scale factors τ to evaluate")
    args = ap.parse_args()
    fp_linears = [n for n in args.fp_linears.split(",") if n]
    if unknown := sorted(set(fp_linears) - set(K.LINEARS)):
        ap.error(f"--fp-linears: unknown {', '.join(unknown)} (choose from {', '.join(K.LINEARS)})")
    if K.ATTN_Q in fp_linears and args.q_sharpen != [1.0]:
        ap.error("--q-sharpen scales the quantized attn_q; it cannot be combined with --fp-linears attn_q")
    source = open_source(args.model)
    windows = eval_windows(source, test_text(), args.windows)
    fp = token_losses(TorchModel.from_source(source), windows).mean(0)
    for path in args.nq:
        for tau in args.q_sharpen:
            model = load_nq(path)
            restore_fp(model, source, fp_linears)
            if tau != 1.0:
                sharpen_queries(model, tau)
            q = token_losses(model, windows).mean(0)
            record = {"commit": git_commit(), "machine": machine(), "model": args.model, "nq": str(path),
                      "fp_linears": fp_linears, "q_sharpen": tau, "windows": len(windows),
                      "ratio_all": float((q.mean() - fp.mean()).exp()), "buckets": buckets(fp, q)}
            with open(RESULTS / "position-ppl.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            cells = " ".join(f"{r['positions'][0]}-{r['positions'][1]}: {r['ratio']:.3f}" for r in record["buckets"])
            print(path.name, args.fp_linears or "-", f"τ={tau:g}", cells, f"all: {record['ratio_all']:.3f}")


if __name__ == "__main__":
    main()
