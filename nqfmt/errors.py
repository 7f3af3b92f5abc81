"""The project's one error model: every expected failure is an `NQError`, and every command reports it the same way.

An expected failure is bad input or a missing resource (a malformed file, an unsupported model, a prompt longer than
the context, text that cannot be built); its message is one line a user can act on. Each package derives its own
subclass (`NQFormatError` here, the converter's, the runtime's, nqdata's), so a caller can catch one family or all.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class NQError(Exception):
    """An expected failure; the message says what is wrong and, where it can, how to fix it."""


class NQFormatError(NQError):
    """A `.nq` file (or a plan to write one) breaks the format: the message names the key or tensor and what is
    wrong."""


def one_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def command_errors(prog: str, debug: bool = False, interrupted: str = "interrupted") -> Iterator[None]:
    """The guard every command line runs its work in: an `NQError` or `OSError` becomes one `prog: error: ...` line on
    stderr and exit status 1, Ctrl-C one `prog: <interrupted>` line and status 130 (an interrupt that carries its own
    message, such as a file written before it took effect, prints that instead); with `debug` the traceback shows
    instead. Other exceptions are bugs and propagate."""
    try:
        yield
    except KeyboardInterrupt as e:
        print(f"\n{prog}: {str(e) or interrupted}", file=sys.stderr)
        raise SystemExit(130) from None
    except (NQError, OSError) as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None
