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


def ranks_for_bits(m: int, n: int, bits: float) -> tuple[int, ...]:
    """The ranks of a linear's residual paths for target `bits` (spec/FORMAT.md §4). Where one path can spend the
    target, one path of `rank_for_bits`. Beyond that, the fewest paths P whose total rank
    R = floor((b·m·n/(m+n) − 16·P)/32)·32 (each path's scales cost 16·(m+n) bits) fits P·min(m, n), and R split into
    P multiples of 32 (of min(m, n) where that is smaller) as equal as possible, the first paths taking the
    remainder."""
    if bits <= max_single_path_bits(m, n):
        return (rank_for_bits(m, n, bits),)
    p = 2
    while (total := _total_rank(m, n, bits, p)) > p * min(m, n):
        p += 1
    return split_rank(total, m, n, p)


def split_rank(total: int, m: int, n: int, paths: int | None = None) -> tuple[int, ...]:
    """A linear's total rank as paths: `paths` of them (default: the fewest of rank ≤ min(m, n)), as equal as the
    rank unit (32, or min(m, n) where smaller) allows, the first paths taking the remainder."""
    top, unit = min(m, n), min(32, m, n)
    p = paths or max(1, -(-total // top))
    units, extra = divmod(total // unit, p)
    return tuple(min(top, unit * (units + (i < extra))) for i in range(p))


def _total_rank(m: int, n: int, bits: float, paths: int) -> int:
    unit = min(32, m, n)
    return max(unit * paths, int((bits * m * n / (m + n) - SCALE_BITS * paths) // unit) * unit)


def linear_bits(m: int, n: int, ranks: tuple[int, ...], has_mid: bool = False) -> int:
    """Storage bits of a linear's paths (bias not counted)."""
    return sum(path_bits(m, n, r, has_mid) for r in ranks)
