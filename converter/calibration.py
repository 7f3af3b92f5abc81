"""Calibration windows: token windows drawn *without replacement* from one or more text files.

The texts are tokenized once (joined by blank lines, no BOS), cut into non-overlapping windows of `seqlen` tokens, and
`samples` of those windows are chosen by a seeded permutation. Drawing without replacement fixes the official code's
loader, which re-draws with replacement and keeps only ~61% unique windows (spec/CONVERTER.md, stage 1).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from nqfmt.errors import NQError


class CalibrationError(NQError):
    """The calibration text cannot supply the requested windows (one clear line)."""


def default_calibration_texts() -> list[Path]:
    """The project's calibration mix (`nqdata`), built on first use: the Wikipedia training text and a public-domain
    novel, whose narrative prose keeps the quantized model from fitting Wikipedia alone (spec/CONVERTER.md,
    "Calibration text")."""
    from nqdata import default_text, fiction_text
    return [default_text("train"), fiction_text()]


def read_texts(paths: Sequence[Path]) -> str:
    """The files' contents joined by blank lines; a missing or unreadable file raises CalibrationError naming it."""
    parts = []
    for p in paths:
        try:
            parts.append(Path(p).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise CalibrationError(f"cannot read calibration text {p}: {getattr(e, 'strerror', None) or e}") from e
    return "\n\n".join(parts)


def draw_windows(tokens: Sequence[int], samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`samples` distinct non-overlapping windows of `seqlen` tokens, [samples, seqlen] int64, chosen by `seed`."""
    if samples < 1 or seqlen < 2:
        raise CalibrationError(f"need at least 1 sample of at least 2 tokens, got {samples} × {seqlen}")
    available = len(tokens) // seqlen
    if available < samples:
        raise CalibrationError(f"the calibration text holds {available} windows of {seqlen} tokens "
                               f"({len(tokens)} tokens); {samples} requested — give more text with --calib "
                               f"or lower --samples/--seqlen")
    ids = torch.tensor(tokens[:available * seqlen], dtype=torch.int64).view(available, seqlen)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples]
    return ids[order].contiguous()


def calibration_tokens(tokenizer, paths: Sequence[Path]) -> list[int]:
    """The texts' token ids under `tokenizer` (a `tokenizers.Tokenizer`), no special tokens: what windows are cut from."""
    return tokenizer.encode(read_texts(paths), add_special_tokens=False).ids


def calibration_windows(tokenizer, paths: Sequence[Path], samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Tokenize the texts and draw the windows."""
    return draw_windows(calibration_tokens(tokenizer, paths), samples, seqlen, seed)


def windows_sha256(windows: torch.Tensor) -> str:
    """Fingerprint of the exact calibration tokens (goes into the file's provenance)."""
    return hashlib.sha256(windows.to(torch.int32).numpy().tobytes()).hexdigest()
