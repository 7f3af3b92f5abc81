"""Where the project keeps what it downloads or builds once per machine: the default text, the default model's
wheel, compiled numba kernels. One rule for all of them: $NANOQUANT_CACHE, else $XDG_CACHE_HOME/nanoquant, else
~/.cache/nanoquant."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """`text` as UTF-8 at `path`, through a `.partial` sibling renamed into place (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def cache_dir() -> Path:
    """The project's cache directory (not created here)."""
    if env := os.environ.get("NANOQUANT_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanoquant"
