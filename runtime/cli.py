"""`nqrun` and `nqeval`: argument handling only; the work is in language_model.py, generate.py, perplexity.py.

Every expected failure (malformed file, prompt longer than the context, unknown backend, CuPy missing, bad
sampling values, unreadable text) prints one line on stderr and exits 1; --debug shows the traceback instead.
"""
from __future__ import annotations

import time

_STARTED = time.perf_counter()  # time to first token counts from here: imports, file load, prefill

import os  # noqa: E402
import resource  # noqa: E402
import stat  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import typer  # noqa: E402
from nqfmt.errors import command_errors  # noqa: E402

def _guard(prog: str, debug: bool, work: Callable[[], None]) -> None:
    with command_errors(prog, debug):
        work()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _print_stats(stats, first_token_seconds: float) -> None:
    print(f"prefill: {stats.prefill_tokens} tokens, {stats.prefill_tps:.1f} tok/s", file=sys.stderr)
    print(f"decode: {stats.decode_tokens} tokens, {stats.decode_tps:.1f} tok/s", file=sys.stderr)
    print(f"time to first token: {first_token_seconds:.3f} s", file=sys.stderr)
    print(f"peak RSS: {_peak_rss_mb():.0f} MB", file=sys.stderr)


def run(
    file: Path = typer.Argument(..., help="A .nq model file."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Continue this text (with --chat: one turn)."),
    chat: bool = typer.Option(False, "--chat", help="Chat using the file's template (a REPL unless --prompt)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for --chat."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.8, help="0 = greedy."),
    top_k: int = typer.Option(40, help="0 = off."),
    top_p: float = typer.Option(0.95, help="1 = off."),
    min_p: float = typer.Option(0.05, help="0 = off."),
    repetition_penalty: float = typer.Option(1.0, help="1 = off."),
    seed: Optional[int] = typer.Option(None, help="Random seed (default: random)."),
    stop: list[str] = typer.Option([], "--stop", help="Stop at this string (repeatable)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context size (default: the model's)."),
    backend: str = typer.Option("auto", help="auto | numba | numpy | cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads (default: cores, at most 4)."),
    exact: bool = typer.Option(False, "--exact", help="Every product in float32 (default: a 4-bit / Q8_0 head's input "
                                                       "as int8 on x86 CPUs with VNNI or AVX2 alone, and on AVX2 "
                                                       "alone the binary linears' inputs in 11-bit fixed point)."),
    stats: bool = typer.Option(False, "--stats", help="Print prefill/decode speed, time to first token, peak RSS."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip checking every tensor's checksum at load."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Run a .nq model: continue a prompt, or chat."""
    def work() -> None:
        from . import NQRunError, load
        if prompt is None and not chat:
            raise NQRunError("give --prompt TEXT, or --chat")
        model = load(file, backend=backend, threads=threads, n_ctx=ctx, exact=exact, verify=not no_verify)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, seed=seed)
        if not chat:
            _emit(model.stream(prompt, max_tokens, stop, **sampling), stats, model, _STARTED)
            return
        messages = [{"role": "system", "content": system}] if system else []
        if prompt is not None:
            _emit(model.chat_stream(messages + [{"role": "user", "content": prompt}], max_tokens, stop, **sampling),
                  stats, model, _STARTED)
            return
        _repl(model, messages, max_tokens, stop, sampling, stats)

    _guard("nqrun", debug, work)


def _emit(pieces, stats: bool, model, started: float) -> str:
    """Print pieces as they come; returns the whole text. Time to first token runs from `started`."""
    out = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        out.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        _print_stats(model.stats, model.stats.first_token_at - started)
    return "".join(out)


def _repl(model, messages: list[dict[str, str]], max_tokens: int, stop: list[str], sampling: dict,
          stats: bool) -> None:
    """Read a line, answer it, keep the conversation. /reset forgets it, /exit (or Ctrl-D) leaves. A line that is not
    valid UTF-8 reaches the tokenizer with its bad bytes escaped and is refused there, like any bad request."""
    from . import NQRunError
    print(f"{model.info}\n/reset clears the conversation, /exit quits.", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    start = list(messages)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages[:] = start
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = _emit(model.chat_stream(messages, max_tokens, stop, **sampling), stats, model,
                          time.perf_counter())
        except NQRunError as e:
            messages.pop()
            print(f"nqrun: error: {e} (/reset to start over)", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply})


def evaluate(
    file: Path = typer.Argument(..., help="A .nq model file."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file (default: the project's test text)."),
    ctx: int = typer.Option(2048, "--ctx", help="Window length in tokens."),
    windows: Optional[int] = typer.Option(None, "--windows", help="Use the first N windows (default: all)."),
    backend: str = typer.Option("auto", help="auto | numba | numpy | cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads."),
    exact: bool = typer.Option(False, "--exact", help="Every product in float32 (the reference)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip checking every tensor's checksum at load."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Perplexity of a .nq model on non-overlapping windows (ctx − 1 scored tokens each, no BOS)."""
    def work() -> None:
        from . import load
        from .perplexity import perplexity
        path = text if text is not None else _default_text()
        body = _read_text(Path(path))
        model = load(file, backend=backend, threads=threads, exact=exact, verify=not no_verify)
        ids = model.tokenizer.encode(body, add_bos=False)

        def progress(i: int, n: int, ppl: float) -> None:
            print(f"\rwindow {i}/{n}: ppl {ppl:.4f}", end="", file=sys.stderr, flush=True)

        result = perplexity(model.model, ids, ctx, windows, progress)
        print(file=sys.stderr)
        print(f"ppl: {result.ppl:.4f} ({result.windows} windows × {ctx - 1} scored tokens, {path})")
        print(f"tokens/s: {result.tokens_per_second:.1f}")

    _guard("nqeval", debug, work)


def _read_text(path: Path) -> str:
    """A UTF-8 text file; a FIFO or device (which could block or never end) is refused without reading it."""
    from .errors import NQRunError
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NQRunError(f"{path} is not a regular file (a directory, device or FIFO)")
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise NQRunError(f"{path} is not UTF-8 text") from None


def _default_text() -> Path:
    """nqdata's test split where the package is installed; otherwise --text is required."""
    from .errors import NQRunError
    try:
        import nqdata
    except ImportError:
        raise NQRunError("no --text given and the nqdata package is not installed") from None
    return nqdata.default_text("test")


def _app(command: Callable) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    return app


def run_main() -> None:
    _app(run)()


def eval_main() -> None:
    _app(evaluate)()


if __name__ == "__main__":
    run_main()
