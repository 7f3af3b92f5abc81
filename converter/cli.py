"""`nqconvert MODEL OUT.nq`: the command line of the converter (typer).

Every bad input ends with one `nqconvert: error: ...` line and exit status 1 (a traceback only with --debug), and
leaves nothing behind; an interrupted run keeps its work directory so that `--resume` can continue it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from nqfmt.errors import command_errors

from .pipeline import PRESETS, Options, Summary, available_cores, convert
from .progress import LineReporter, RichReporter

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Convert a Hugging Face or GGUF model to a NanoQuant .nq file (binary factors, ≤1 bit/weight).")


def summary_table(s: Summary) -> Table:
    """The end-of-run summary: bits both ways, size and ratio, time per stage, peak RSS."""
    t = Table(title=f"nqconvert: wrote {s.out}", show_header=False)
    t.add_row("bits per weight, target", f"{s.bits_target:g}")
    t.add_row("bits per weight, decoder linears (signs + scales)", f"{s.bpw_linears:.4f}")
    t.add_row("bits per weight, whole file (bytes × 8 / parameters)", f"{s.bpw_file:.4f}")
    t.add_row("file size", f"{s.file_bytes / 2**20:.2f} MiB ({s.ratio_to_fp16:.2f}× smaller than FP16)")
    for stage, seconds in s.stage_seconds.items():
        t.add_row(f"time: {stage}", f"{seconds:.1f} s")
    t.add_row("peak RSS", f"{s.peak_rss_mb:.0f} MB")
    return t


@app.command()
def nqconvert(
    model: str = typer.Argument(..., help="Hugging Face model directory, .gguf file, or 'smollm2-135m'"),
    out: Path = typer.Argument(..., help="output .nq file (written atomically)"),
    bits: float = typer.Option(1.0, help="target bits per weight of the decoder linears, 0.5 to 4 (above one "
                                          "path's maximum a linear carries residual paths)"),
    preset: str = typer.Option("quick", help=f"recipe: {', '.join(PRESETS)}"),
    calib: Optional[list[Path]] = typer.Option(None, help="calibration text file(s); default: the project's "
                                                          "mix (Wikipedia and a novel, built by nqdata)"),
    samples: Optional[int] = typer.Option(None, help="calibration windows of the block stage (default: the "
                                                      "preset's); distillation's windows scale with it"),
    seqlen: Optional[int] = typer.Option(None, help="tokens per calibration window (default: the preset's)"),
    allocation: Optional[str] = typer.Option(None, help="how ranks are spread over the linears: uniform, fisher "
                                                        "(where a Fisher estimate says they lower the loss most), or "
                                                        "last-block (the bits uniform ranks leave, in the last "
                                                        "block); default: the preset's"),
    embedding: Optional[str] = typer.Option(None, help="how the embedding and head are stored: f16, q8_0, q4_0, "
                                                         "iq4_nl, q4_0+K or iq4_nl+K (the K most frequent tokens' "
                                                         "rows at Q8_0), binary, binary:RANK or binary:RANKxPATHS "
                                                         "(default: the preset's)"),
    seed: int = typer.Option(0, help="seed of every random choice, 0..2^63-1"),
    threads: Optional[int] = typer.Option(None, help="torch threads, at most the cores available (default: all)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoints in OUT.work/"),
    no_error_mitigation: bool = typer.Option(False, "--no-error-mitigation", help="skip error mitigation"),
    no_refine: bool = typer.Option(False, "--no-refine", help="skip the latent/scale refinement"),
    no_model_recon: bool = typer.Option(False, "--no-model-recon", help="skip model reconstruction"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Convert MODEL to OUT.nq."""
    options = Options(model=model, out=out, bits=bits, preset=preset, calib=tuple(calib or ()), samples=samples,
                      seqlen=seqlen, seed=seed, threads=threads if threads is not None else available_cores(),
                      resume=resume, error_mitigation=not no_error_mitigation, refine=not no_refine,
                      model_recon=not no_model_recon, embedding=embedding,
                      allocation=allocation)
    reporter = RichReporter() if sys.stderr.isatty() else LineReporter(sys.stderr)
    with command_errors("nqconvert", debug, f"interrupted; run again with --resume to continue from {out}.work/"):
        try:
            summary = convert(options, reporter)
        finally:
            reporter.close()
    Console().print(summary_table(summary))


def main() -> None:
    """Console-script entry point (`nqconvert`)."""
    app()
