"""`nqinfo FILE [--verify] [--json]`: what a .nq file holds, and whether it is intact."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from .errors import command_errors
from .info import rank_lines, summarize
from .reader import open_nq

app = typer.Typer(add_completion=False, help="Describe (and optionally verify) a NanoQuant .nq file.")


@app.command()
def nqinfo(
    file: Path = typer.Argument(..., help="a .nq file"),
    verify: bool = typer.Option(False, "--verify", help="also check every tensor's CRC32 and the padding"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    with command_errors("nqinfo", debug):
        f = open_nq(file)
        if verify:
            f.verify()
        info = summarize(f)
    info["verified"] = verify
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    mb = 1 / 2**20
    typer.echo(f"{info['file']}: NanoQuant v{info['format_version']}, {info['architecture']}, {info['source']}")
    typer.echo(f"  {info['layers']} layers, hidden {info['hidden']}, heads {info['heads']}/{info['kv_heads']} "
               f"(dim {info['head_dim']}), ffn {info['ffn']}, vocab {info['vocab']}, context {info['context_length']}"
               f", embeddings {info['embedding_type']}{' (tied)' if info['tied_embeddings'] else ''}")
    typer.echo(f"  preset {info['preset']}, converted {info['date']} by {info['converter_version']}")
    typer.echo(f"  bits per weight: target {info['bits_target']:.3f}, decoder linears {info['bpw_decoder_linears']:.4f}"
               f", whole file {info['bpw_whole_file']:.4f}")
    typer.echo(f"  size {info['file_bytes'] * mb:.2f} MiB vs FP16 {info['fp16_bytes'] * mb:.2f} MiB "
               f"({info['compression_vs_fp16']:.2f}x smaller), {info['tensors']} tensors")
    typer.echo("  ranks:")
    for line in rank_lines(info["ranks"]):
        typer.echo(line)
    if verify:
        typer.echo("  verify: all checksums and padding OK")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="nqinfo")


if __name__ == "__main__":
    sys.exit(main())
