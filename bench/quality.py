"""Convert a model with a preset and measure perplexity by spec/EVALUATION.md §2, full precision beside the `.nq` file.

    PYTHONPATH=. nice python bench/quality.py --preset quick [--bits 1.0] [--embedding q4_0] [--allocation last-block] [--no-refine ...]
        [--text FILE]

Writes bench/results/quality-<model>-<preset>[-b<bits>][-<ablation>][-emb-<choice>].json: commit, machine, load
average, settings, bits per weight both ways, file size, seconds per stage, perplexities and their ratio, peak RSS. The full-precision
perplexity for a (model, text, windows) triple is cached in bench/results/fp-ppl-*.json (the script computed it).
Runs whose JSON exists are skipped unless --force, so a queue of runs resumes where it stopped.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converter.torch_model import TorchModel, load_nq  # noqa: E402
from converter.calibration import default_calibration_texts, read_texts  # noqa: E402
from converter.pipeline import Options, convert  # noqa: E402
from converter.progress import LineReporter  # noqa: E402
from converter.sources import open_source  # noqa: E402
from nqfmt import open_nq  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WINDOW = 2048


def test_text() -> Path:
    """The project's evaluation text (nqdata's test split)."""
    from nqdata import default_text
    return default_text("test")


def eval_windows(source, text: Path, windows: int) -> torch.Tensor:
    """§7: the whole file tokenized once, no BOS, non-overlapping 2048-token windows, the first `windows`."""
    ids = source.hf_tokenizer().encode(text.read_text(encoding="utf-8"), add_special_tokens=False).ids
    n = min(windows, len(ids) // WINDOW)
    return torch.tensor(ids[:n * WINDOW], dtype=torch.int64).view(n, WINDOW)


@torch.no_grad()
def token_losses(model: TorchModel, windows: torch.Tensor) -> torch.Tensor:
    """[windows, 2047] next-token cross-entropy at every shifted position, one window at a time."""
    return torch.stack([F.cross_entropy(model(w[None])[0][:-1], w[1:], reduction="none") for w in windows])


def perplexity(model: TorchModel, windows: torch.Tensor) -> float:
    """exp of the mean over windows of the mean next-token cross-entropy over 2047 shifted tokens."""
    return math.exp(float(token_losses(model, windows).double().mean(1).mean()))


def git_commit() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    """The CPU's model name and clock from /proc/cpuinfo: our 2-core VMs land on different hosts (an AMX Xeon, a
    2.6 GHz EPYC) whose speeds differ by ~25%, and platform.processor() is empty on Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    info = {k.strip(): v.strip() for k, sep, v in (line.partition(":") for line in text.splitlines()) if sep}
    model = info.get("model name", platform.processor())
    return f"{model} @ {float(info['cpu MHz']):.0f} MHz" if "cpu MHz" in info else model


def file_sha256(path: Path) -> str:
    """What a text's figures depend on: its exact bytes (the default text varies with the parser that built it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def machine() -> dict:
    return {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def fp_perplexity(model: str, source, windows: torch.Tensor, text: Path) -> dict:
    """Full-precision (float32 torch) perplexity on the identical windows, cached per model/text/window count."""
    key = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    path = RESULTS / f"fp-ppl-{model}-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    t = time.perf_counter()
    ppl = perplexity(TorchModel.from_source(source), windows)
    rec = {"model": model, "text": str(text), "windows": len(windows), "ppl": ppl, "dtype": "float32",
           "seconds": time.perf_counter() - t, "commit": git_commit(), "load_average": os.getloadavg()}
    path.write_text(json.dumps(rec, indent=2))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--bits", type=float, default=1.0)
    ap.add_argument("--text", type=Path, default=None, help="evaluation text (default: the project's test text)")
    ap.add_argument("--calib", type=Path, nargs="+", default=None,
                    help="calibration text file(s) (default: the project's mix); names the JSON -calib-<sha256 prefix "
                         "of the texts as the converter joins them>")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embedding", default=None, help="an --embedding choice of nqconvert (default: the preset's); "
                                                      "names the JSON -emb-<choice>")
    ap.add_argument("--allocation", default=None, help="an --allocation rule of nqconvert (uniform, fisher, "
                                                       "last-block; default: the preset's); names the JSON -alloc-<rule>")
    ap.add_argument("--kl-blocks", type=int, default=None, help="the last N blocks tuned on the output KL "
                                                                 "(default: the preset's)")
    ap.add_argument("--recon-samples", type=int, default=None, help="distillation windows (default: the preset's)")
    ap.add_argument("--no-error-mitigation", action="store_true")
    ap.add_argument("--no-refine", action="store_true")
    ap.add_argument("--no-model-recon", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--resume", action="store_true", help="continue from OUT.work/ (the JSON records that the stages "
                                                          "before it were not timed in this run)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ablation = [n for n, off in (("nomit", args.no_error_mitigation), ("norefine", args.no_refine),
                                 ("norecon", args.no_model_recon)) if off]
    ablation += [f"seed{args.seed}"] if args.seed else []
    ablation += [f"emb-{args.embedding.replace(':', '-')}"] if args.embedding else []
    ablation += [f"alloc-{args.allocation}"] if args.allocation else []
    ablation += [f"kl{args.kl_blocks}"] if args.kl_blocks is not None else []
    ablation += [f"recon{args.recon_samples}"] if args.recon_samples is not None else []
    calib = args.calib or default_calibration_texts()
    ablation += [f"calib-{hashlib.sha256(read_texts(calib).encode('utf-8')).hexdigest()[:8]}"] if args.calib else []
    name = "-".join([f"quality-{Path(args.model).name}-{args.preset}"]
                    + ([f"b{args.bits:g}"] if args.bits != 1.0 else []) + ablation)
    result_path = RESULTS / f"{name}.json"
    if result_path.is_file() and not args.force:
        print(f"{result_path} exists; skipping (use --force to rerun)")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = args.text or test_text()
    load_before = os.getloadavg()
    commit = git_commit()  # the code that converts, even if HEAD moves during the run
    out = args.out_dir / f"{name}.nq"
    t0 = time.perf_counter()
    summary = convert(Options(model=args.model, out=out, bits=args.bits, preset=args.preset, seed=args.seed,
                              threads=args.threads, error_mitigation=not args.no_error_mitigation,
                              refine=not args.no_refine, model_recon=not args.no_model_recon,
                              embedding=args.embedding, allocation=args.allocation, kl_blocks=args.kl_blocks,
                              recon_samples=args.recon_samples, resume=args.resume,
                              calib=calib if args.calib else ()),
                      LineReporter(sys.stdout))
    convert_seconds = time.perf_counter() - t0
    load_after_convert = os.getloadavg()

    source = open_source(args.model)
    windows = eval_windows(source, text, args.windows)
    fp = fp_perplexity(Path(args.model).name, source, windows, text)
    t = time.perf_counter()
    ppl = perplexity(load_nq(out), windows)
    record = {
        "commit": commit, "machine": machine(), "load_average_start": load_before,
        "load_average_after_convert": load_after_convert, "load_average_end": os.getloadavg(),
        "settings": {"model": args.model, "preset": args.preset, "bits": args.bits, "seed": args.seed,
                     "threads": torch.get_num_threads(), "embedding": args.embedding, "allocation": args.allocation,
                     "kl_blocks": args.kl_blocks, "recon_samples": args.recon_samples,
                     "error_mitigation": not args.no_error_mitigation,
                     "refine": not args.no_refine, "model_recon": not args.no_model_recon,
                     "text": str(text), "text_sha256": file_sha256(text),
                     "calibration_texts": [{"path": str(p), "sha256": file_sha256(p)} for p in calib],
                     "mwparserfromhell": importlib.metadata.version("mwparserfromhell"), "windows": len(windows),
                     "recipe": json.loads(open_nq(out).provenance.recipe)},
        "bits_target": args.bits, "bpw_decoder_linears": summary.bpw_linears, "bpw_whole_file": summary.bpw_file,
        "file_bytes": summary.file_bytes, "ratio_to_fp16": summary.ratio_to_fp16,
        "convert_seconds_wall": convert_seconds, "resumed": args.resume, "seconds_per_stage": summary.stage_seconds,
        "peak_rss_mb_convert": summary.peak_rss_mb,
        "ppl_fp32": fp["ppl"], "ppl_quantized": ppl, "ppl_ratio": ppl / fp["ppl"],
        "eval_seconds_quantized": time.perf_counter() - t,
        "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    result_path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
