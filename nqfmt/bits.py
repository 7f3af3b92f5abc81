"""Ranks from a bits-per-weight target, and the two bits-per-weight counts of the spec (spec/FORMAT.md §4)."""
from __future__ import annotations

SCALE_BITS = 16


def rank_for_bits(m: int, n: int, bits: float) -> int:
    """Rank of one binary path for target `bits` on an m×n linear: floor((b·m·n/(m+n) − 16)/32)·32, clamped to
    [32, min(m, n)] (spec/FORMAT.md §4)."""
    r = int((bits * m * n / (m + n) - SCALE_BITS) // 32) * 32
    return min(max(r, 32), min(m, n))


def path_bits(m: int, n: int, r: int, has_mid: bool = False) -> int:
    """Storage bits of one path as the paper counts them: one per sign, 16 per scale entry (bias not counted)."""
    return r * (m + n) + SCALE_BITS * (m + n + (r if has_mid else 0))


def max_single_path_bits(m: int, n: int) -> float:
    """Largest bits per weight one path can spend on an m×n linear (rank min(m, n))."""
    return path_bits(m, n, min(m, n)) / (m * n)
