"""Accuracy per bit on the default model: NanoQuant at several targets beside llama.cpp's types and HQQ, one picture.

    python bench/pareto.py [--bits 0.55 0.8 1.0 1.5 2.0] [--allocation uniform last-block] [--preset quick]
                           [--no-ours] [--no-llama] [--no-hqq] [--plot-only]

Every point is the perplexity ratio on the 40 test windows of spec/EVALUATION.md §2 (the same token windows for every
method) against bits per weight counted two ways: over the whole file, and over the decoder linears only.
- ours: `bench/quality.py --preset P --bits B --allocation A` for every (preset, bits, allocation) not yet measured
  (each writes its own bench/results/quality-*.json; a run that exists is skipped, so the command resumes), and the
  points earlier runs measured (MEASURED), drawn whichever flags are given.
- llama.cpp (llama-cpp-python): the default model's F16 GGUF quantized by `llama_model_quantize` to each --llama type;
  the type each decoder linear really got is read back from the file (llama.cpp falls back to another type where a
  row length does not fit a type's block), and perplexity is computed from its logits over the same windows.
- HQQ (pip package `hqq`, calibration-free): every decoder linear of the full-precision torch model quantized at 2, 3
  and 4 bits (group size 64, fp16 scale and zero per group), perplexity through the same torch evaluation.
Each peer point is one JSON in bench/results/pareto/; the summary goes to bench/results/pareto-<model>.json and the
picture to bench/results/pareto-<model>.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import RESULTS, eval_windows, git_commit, machine, test_text  # noqa: E402

POINTS = RESULTS / "pareto"
LLAMA_TYPES = ("F16", "Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q3_K_S", "Q2_K", "IQ2_XXS")
HQQ_BITS = (2, 3, 4)
HQQ_GROUP = 64
MODEL = "smollm2-135m"
DECODER_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# --- ours -----------------------------------------------------------------------------------------------------------
def quality_name(preset: str, bits: float, allocation: str, embedding: str | None) -> str:
    """The JSON bench/quality.py writes for these settings (its naming rule)."""
    parts = [f"quality-{MODEL}-{preset}"] + ([f"b{bits:g}"] if bits != 1.0 else [])
    parts += [f"emb-{embedding.replace(':', '-')}"] if embedding else []
    return "-".join(parts + [f"alloc-{allocation}"]) + ".json"


def series_name(preset: str, allocation: str, embedding: str | None) -> str:
    """A sweep point's series: the preset's default recipe (its own allocation and table) joins the MEASURED points
    of that recipe."""
    from converter.pipeline import PRESETS
    if embedding is None and allocation == PRESETS[preset].allocation:
        return f"nanoquant {preset} (default recipe)"
    return f"nanoquant {preset}" + ("" if allocation == "uniform" else f", {allocation} allocation")


def run_ours(preset: str, bits: float, allocation: str, embedding: str | None) -> dict | None:
    path = RESULTS / quality_name(preset, bits, allocation, embedding)
    if not path.is_file():
        cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--preset", preset, "--bits", f"{bits:g}",
               "--allocation", allocation] + (["--embedding", embedding] if embedding else [])
        print("running", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0 or not path.is_file():
            print(f"failed: {' '.join(cmd)}", flush=True)
            return None
    rec = json.loads(path.read_text())
    return dict(method=series_name(preset, allocation, embedding),
                target=bits, bpw_file=rec["bpw_whole_file"], bpw_linears=rec["bpw_decoder_linears"],
                ratio=rec["ppl_ratio"], ppl=rec["ppl_quantized"], source=path.name)


# Points measured by earlier runs (bench/quality.py or a fresh install), drawn beside the sweep's own: (JSON, series).
# Their embedding is whatever the run stored, named in the series (the presets' default changed from f16 to
# iq4_nl+5120 at 931a890, quick's to last-block ranks with iq4_nl+3072 at 051a108, and to 768 distillation windows at
# 6b68613).
MEASURED = (
    ("quality-smollm2-135m-quick-recon768.json", "nanoquant quick (default recipe)"),
    ("quality-smollm2-135m-quick-b2-recon768.json", "nanoquant quick (default recipe)"),
    ("quality-smollm2-135m-standard-emb-iq4_nl+3072-alloc-last-block.json", "nanoquant standard (default recipe)"),
    ("quality-smollm2-135m-standard-b2.json", "nanoquant standard (default recipe)"),
    ("quality-smollm2-135m-quick-emb-iq4_nl+3072-alloc-last-block.json", "nanoquant quick, 512 windows (051a108)"),
    ("quality-smollm2-135m-quick-b2-alloc-last-block.json", "nanoquant quick, 512 windows (051a108)"),
    ("quality-smollm2-135m-quick-emb-iq4_nl+5120.json", "nanoquant quick, IQ4_NL+5120 table"),
    ("quality-smollm2-135m-quick-emb-binary-512x2.json", "nanoquant quick, binary 512x2 table"),
    ("quality-smollm2-135m-quick-alloc-last-block.json", "nanoquant quick, IQ4_NL+5120 table"),
    ("quality-smollm2-135m-quick-alloc-fisher.json", "nanoquant quick, F16 table, fisher allocation"),
    ("quality-smollm2-135m-quick-b0.55.json", "nanoquant quick, F16 table"),
    ("quality-smollm2-135m-quick-b0.8.json", "nanoquant quick, F16 table"),
    ("fresh-install-quick-0c2587d.json", "nanoquant quick, F16 table"),
    ("quality-smollm2-135m-quick-b2-alloc-uniform.json", "nanoquant quick, F16 table"),
    ("quality-smollm2-135m-standard.json", "nanoquant standard, F16 table"),
)


def measured_points() -> list[dict]:
    """The MEASURED points whose JSON exists."""
    points = []
    for name, series in MEASURED:
        path = RESULTS / name
        if path.is_file():
            rec = json.loads(path.read_text())
            target = rec.get("bits_target") or 1.0
            points.append(dict(method=series, label=f"{target:g}", bpw_file=rec["bpw_whole_file"],
                               bpw_linears=rec["bpw_decoder_linears"], ratio=rec["ppl_ratio"], source=name))
    return points


# --- llama.cpp ------------------------------------------------------------------------------------------------------
def llama_point(ftype: str, work: Path) -> dict:
    path = POINTS / f"llama-{ftype}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from bench.speed import original_q4_1, quantize
    f16 = quantize(original_q4_1(), work / "f16.gguf", "LLAMA_FTYPE_MOSTLY_F16")
    gguf = work / f"{ftype}.gguf"
    if ftype == "F16":
        gguf = f16
    elif not gguf.exists():  # in a subprocess: llama.cpp aborts the process on some types (IQ2 without an imatrix)
        code = ("import sys; from pathlib import Path; from bench.speed import quantize; "
                "quantize(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])")
        done = subprocess.run([sys.executable, "-c", code, str(f16), str(gguf), f"LLAMA_FTYPE_MOSTLY_{ftype}"],
                              cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if done.returncode != 0:
            rec = dict(method="llama.cpp", type=ftype, error=f"llama_model_quantize failed (exit {done.returncode})",
                       stderr_tail=done.stderr[-1500:], commit=git_commit())
            path.write_text(json.dumps(rec, indent=1))
            return rec
    cmd = [sys.executable, str(Path(__file__)), "--llama-worker", str(gguf)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp evaluation of {ftype} failed:\n{done.stderr[-3000:]}")
    rec = dict(method="llama.cpp", type=ftype, **json.loads(done.stdout.strip().splitlines()[-1]),
               **gguf_bits(gguf), commit=git_commit(), machine=machine(), load_average=os.getloadavg())
    path.write_text(json.dumps(rec, indent=1))
    return rec


def gguf_bits(path: Path) -> dict:
    """Bits per weight of a llama.cpp file over the whole file and over the decoder linears, and the types its
    decoder linears really have (with how many tensors each)."""
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    params = sum(int(t.n_elements) for t in reader.tensors)
    linears = [t for t in reader.tensors if t.name.split(".")[-2] in DECODER_LINEARS]
    types: dict[str, int] = {}
    for t in linears:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return dict(bpw_file=path.stat().st_size * 8 / params,
                bpw_linears=sum(int(t.n_bytes) for t in linears) * 8 / sum(int(t.n_elements) for t in linears),
                linear_types=types, file_bytes=path.stat().st_size)


def llama_worker(gguf: str) -> dict:
    """Perplexity of a llama.cpp file on the protocol's windows (run in its own process)."""
    import numpy as np
    from llama_cpp import Llama

    from converter.sources import open_source
    windows = eval_windows(open_source(MODEL), test_text(), 40)
    llm = Llama(model_path=gguf, n_ctx=windows.shape[1], logits_all=True, n_threads=len(os.sched_getaffinity(0)),
                verbose=False, n_batch=512)  # the cores this process may use (taskset narrows them)
    nll = []
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:len(w) - 1], dtype=np.float64)
        top = logits.max(1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
        nll.append(float(np.mean(logz - logits[np.arange(len(w) - 1), w[1:]])))
    return dict(ppl=math.exp(sum(nll) / len(nll)), windows=len(nll))


# --- HQQ ------------------------------------------------------------------------------------------------------------
def hqq_point(nbits: int) -> dict:
    path = POINTS / f"hqq-{nbits}bit.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from bench.quality import fp_perplexity, perplexity
    from converter.sources import open_source
    from converter.torch_model import TorchModel
    source = open_source(MODEL)
    text = test_text()
    windows = eval_windows(source, text, 40)
    fp = fp_perplexity(MODEL, source, windows, text)["ppl"]
    model = TorchModel.from_source(source)
    config = BaseQuantizeConfig(nbits=nbits, group_size=HQQ_GROUP)
    linear_params = 0
    for block in model.blocks:
        for name, lin in block.linears.items():
            linear_params += lin.weight.numel()  # before HQQLinear, which frees the original weight
            block.linears[name] = HQQLinear(lin, quant_config=config, compute_dtype=torch.float32, device="cpu")
    ppl = perplexity(model, windows)
    c = source.config
    linear_bits = nbits + 2 * 16 / HQQ_GROUP  # codes, then an fp16 scale and zero per group
    other = c.parameter_count() - linear_params  # embedding, norms: F16 as llama.cpp's F16 keeps them
    rec = dict(method="HQQ", nbits=nbits, group_size=HQQ_GROUP, ppl=ppl, ratio=ppl / fp, bpw_linears=linear_bits,
               bpw_file=(linear_bits * linear_params + 16 * other) / c.parameter_count(), commit=git_commit(),
               machine=machine(), load_average=os.getloadavg())
    path.write_text(json.dumps(rec, indent=1))
    return rec


# --- the picture ----------------------------------------------------------------------------------------------------
Y_MAX = 100.0  # the picture's top: a point above it is drawn on the edge with its value


def plot(points: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    methods = sorted({p["method"] for p in points})
    for ax, key, label in ((axes[0], "bpw_file", "bits per weight, whole file"),
                           (axes[1], "bpw_linears", "bits per weight, decoder linears")):
        for method in methods:
            same: dict[tuple, list[str]] = {}  # types that gave one file (fallbacks) share a point and a label
            for p in points:
                if p["method"] == method:
                    same.setdefault((p[key], p["ratio"]), []).append(p.get("label", ""))
            pts = sorted((x, y, " = ".join(filter(None, labels))) for (x, y), labels in same.items())
            line, = ax.plot([x for x, _, _ in pts], [min(y, Y_MAX) for _, y, _ in pts], "o-", label=method,
                            zorder=3 if "default" in method else 2)  # the current default on top of its neighbours
            for x, y, text in pts:
                if y > Y_MAX:  # drawn on the top edge, the value written beside it
                    ax.plot([x], [Y_MAX], "^", color=line.get_color(), markersize=9)
                    text = f"{text} ({y:,.0f}×, off scale)"
                if text:
                    ax.annotate(text, (x, min(y, Y_MAX)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="full precision")
        ax.set_yscale("log")
        ax.set_ylim(top=Y_MAX * 1.3)
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity ÷ full precision (40 × 2048 tokens)")
    axes[1].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: accuracy per bit")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, nargs="+", default=[0.55, 0.8, 1.0, 1.5, 2.0])
    ap.add_argument("--allocation", nargs="+", default=["uniform", "last-block"])
    ap.add_argument("--preset", nargs="+", default=["quick"])
    ap.add_argument("--embedding", default=None, help="embedding type of our files (default: the preset's)")
    ap.add_argument("--llama", nargs="+", default=list(LLAMA_TYPES))
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("NANOQUANT_BENCH_DIR", Path(tempfile.gettempdir()) / "nq-bench")))
    ap.add_argument("--no-ours", action="store_true")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-hqq", action="store_true")
    ap.add_argument("--plot-only", action="store_true", help="only collect what is measured and draw it")
    ap.add_argument("--llama-worker", default=None)
    a = ap.parse_args()
    if a.llama_worker:
        print(json.dumps(llama_worker(a.llama_worker)))
        return
    POINTS.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    points = measured_points()
    if not a.no_ours:
        for preset in a.preset:
            for allocation in a.allocation:
                for bits in a.bits:
                    if a.plot_only and not (RESULTS / quality_name(preset, bits, allocation, a.embedding)).is_file():
                        continue
                    p = run_ours(preset, bits, allocation, a.embedding)
                    if p and p["source"] not in {q.get("source") for q in points}:
                        points.append(p | {"label": f"{bits:g}"})
    if not a.no_llama:
        for ftype in a.llama:
            if a.plot_only and not (POINTS / f"llama-{ftype}.json").is_file():
                continue
            rec = llama_point(ftype, a.work)
            if "error" in rec:
                print(f"llama.cpp {ftype}: {rec['error']}", flush=True)
                continue
            points.append(dict(method="llama.cpp", label=ftype, bpw_file=rec["bpw_file"],
                               bpw_linears=rec["bpw_linears"], ratio=rec["ppl"] / fp_ppl(), ppl=rec["ppl"],
                               linear_types=rec["linear_types"]))
    if not a.no_hqq:
        for nbits in HQQ_BITS:
            if a.plot_only and not (POINTS / f"hqq-{nbits}bit.json").is_file():
                continue
            rec = hqq_point(nbits)
            points.append(dict(method="HQQ", label=f"{nbits}-bit", bpw_file=rec["bpw_file"],
                               bpw_linears=rec["bpw_linears"], ratio=rec["ratio"], ppl=rec["ppl"]))
    summary = dict(commit=git_commit(), machine=machine(), load_average=os.getloadavg(), fp_ppl=fp_ppl(),
                   points=points)
    (RESULTS / f"pareto-{MODEL}.json").write_text(json.dumps(summary, indent=1))
    plot(points, RESULTS / f"pareto-{MODEL}.png")
    for p in points:
        print(f"{p['method']:40s} {p.get('label', ''):8s} file {p['bpw_file']:6.3f} bpw, linears "
              f"{p['bpw_linears']:6.3f} bpw: {p['ratio']:.3f}×")


def fp_ppl() -> float:
    """The full-precision perplexity on the protocol's 40 windows (bench/quality.py computes and caches it)."""
    from bench.quality import fp_perplexity
    from converter.sources import open_source
    source = open_source(MODEL)
    text = test_text()
    return fp_perplexity(MODEL, source, eval_windows(source, text, 40), text)["ppl"]


if __name__ == "__main__":
    main()
