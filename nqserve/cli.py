"""`nqserve FILE.nq`: argument handling; the HTTP side is app.py, the batching engine engine.py.

A file, option or address it cannot use (malformed file, unknown backend, bad --ctx/--threads/--parallel, a port in
use) prints one line on stderr and exits 1, before anything is served.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Optional

import typer
from nqfmt.errors import command_errors


def serve(
    file: Path = typer.Argument(..., help="A .nq model file."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8080, help="TCP port."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context size of each sequence (default: the model's)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads (default: cores, at most 4)."),
    backend: str = typer.Option("auto", help="auto | numba | numpy | cuda."),
    parallel: int = typer.Option(8, "--parallel", help="Most sequences decoded together; more requests queue."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="NQSERVE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1/ (or $NQSERVE_API_KEY)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip checking every tensor's checksum at load."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Serve a .nq model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)."""
    with command_errors("nqserve", debug):
        import uvicorn

        # OpenMP workers sleep as soon as a region ends: the HTTP side's threads need the cores between the engine's
        # regions (runtime/README.md, "Threads"). Set before runtime imports numba.
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        import runtime
        from runtime import NQRunError

        from .app import Server
        from .engine import Engine

        if not 1 <= parallel <= 256:
            raise NQRunError(f"--parallel {parallel}: give 1 to 256 sequences")
        if not 0 < port < 65536:
            raise NQRunError(f"--port {port}: give 1 to 65535")
        lm = runtime.load(file, backend=backend, threads=threads, n_ctx=ctx, verify=not no_verify)
        engine = Engine(lm.model, lm.tokenizer, parallel, lm.generator.n_ctx)
        engine.warm_up()
        server = Server(lm, engine, api_key)
        listening = _listen(host, port)
        print(f"nqserve: {server.model_id} ({lm.info.backend}"
              + (f", {lm.info.threads} threads" if lm.info.threads else "")
              + f", context {engine.n_ctx}, {parallel} in parallel) on http://{host}:{port}/v1", file=sys.stderr,
              flush=True)
    config = uvicorn.Config(server.app(), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[listening])


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port or a bad address is one error line before serving."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(serve)
    app()
