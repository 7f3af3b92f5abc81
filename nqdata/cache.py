"""Where the project keeps what it downloads or builds once per machine: the default text, the default model's
wheel, compiled numba kernels. One rule for all of them: $NANOQUANT_CACHE, else $XDG_CACHE_HOME/nanoquant, else
~/.cache/nanoquant."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The project's cache directory (not created here)."""
    if env := os.environ.get("NANOQUANT_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanoquant"
