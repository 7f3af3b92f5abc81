"""Causal attention over many queries at once (a prefill, an `nqeval` window) as BLAS matrix products.

For each KV head and each block of QUERY_BLOCK queries, the scores of the block's query heads against every key they
may see are one sgemm (queries × keys); compiled passes mask them (causal, sliding window) and soft-cap them, numpy
takes each row's maximum, a compiled pass turns them into unnormalized softmax weights (scale, exp), and a second
sgemm weighs the values; each output row is then divided by its weights' sum. Float32 throughout, as the loop kernel:
only the order of the additions differs. Keys past a block's last query are never scored, so the work is the causal
triangle plus one block's square per block.

The tasks (query block, KV head) are shared among the backend's threads (blas_workers.py).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .blas_workers import BlasWorkers
from .numba_decode import exp32

QUERY_BLOCK = 64  # queries per block: larger blocks make larger products but score more hidden keys
MIN_QUERIES = 8  # below this many queries, or MIN_PAIRS visible query-key pairs, the loop kernel is faster
MIN_PAIRS = 2048


def worth_it(t: int, pos0: int, window: int) -> bool:
    """Whether `t` queries at positions pos0.. (seeing the last `window` positions when window > 0) run faster here
    than in the loop kernel."""
    seen = min(pos0 + t, window) if window > 0 else pos0 + t
    return t >= MIN_QUERIES and t * seen >= MIN_PAIRS


def _visible(q0: int, i: int, k0: int, window: int, keys: int) -> tuple[int, int]:
    """The keys [lo, hi) of a block that query i (position q0 + i) may see; key j is at position k0 + j."""
    hi = min(q0 + i - k0 + 1, keys)
    lo = max(q0 + i - window + 1 - k0, 0) if window > 0 else 0
    return lo, hi


_visible_jit = njit(inline="always", cache=True)(_visible)


@njit(fastmath=True, cache=True, nogil=True)
def mask_scores(s, q0, k0, window, softcap):
    """s (heads, queries, keys) raw scores → −inf where a key is hidden from the query (later than it, or outside
    the window); visible scores soft-capped (softcap·tanh(s/softcap), on the raw score: callers fold the scale into
    softcap) when softcap > 0. Hidden keys lie in the block's first and last QUERY_BLOCK columns only."""
    heads, queries, keys = s.shape
    for h in range(heads):
        for i in range(queries):
            lo, hi = _visible_jit(q0, i, k0, window, keys)
            s[h, i, :lo] = -np.inf
            s[h, i, hi:] = -np.inf
            if softcap > 0:
                for j in range(lo, hi):
                    s[h, i, j] = softcap * math.tanh(s[h, i, j] / softcap)


@njit(fastmath=True, cache=True, nogil=True)
def softmax_weights(s, best, q0, k0, window, scale, p, sums):
    """p[h, i, j] = exp(scale·(s − best[h, i])) for the keys j query i sees, 0 for the others; sums[h, i] = Σ_j
    p[h, i, j]. `best` is the row's largest visible score, so no exponent overflows. (p is a separate array: numba
    vectorizes this loop only when it does not write where it reads.)"""
    heads, queries, keys = s.shape
    for h in range(heads):
        for i in range(queries):
            lo, hi = _visible_jit(q0, i, k0, window, keys)
            shift = best[h, i] * scale
            total = np.float32(0.0)
            for j in range(lo, hi):
                e = exp32(s[h, i, j] * scale - shift)
                p[h, i, j] = e
                total += e
            p[h, i, :lo] = 0.0
            p[h, i, hi:] = 0.0
            sums[h, i] = total


def attention(workers: BlasWorkers, q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos0: int, window: int,
              scale: float, softcap: float, out: np.ndarray) -> None:
    """out (T, H, D) = causal GQA attention of q (T, H, D) at positions pos0.. over one layer's keys/values
    (KV, ctx, D) (already holding these tokens'); window > 0 keeps only the last `window` positions. The
    (query block, KV head) tasks are shared among the workers' threads."""
    tasks = [(b0, g) for b0 in range(0, q.shape[0], QUERY_BLOCK) for g in range(keys.shape[0])]
    workers.run(lambda share: _attend(share, q, keys, values, pos0, window, scale, softcap, out), tasks)


def _attend(tasks: list[tuple[int, int]], q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos0: int,
            window: int, scale: float, softcap: float, out: np.ndarray) -> None:
    """The attention output of queries b0 .. b0 + QUERY_BLOCK − 1 on the query heads of KV head g, for each (b0, g)
    of `tasks`."""
    t, heads, d = q.shape
    group = heads // keys.shape[0]
    # tanh(scale·s/c)·c = tanh(s/(c/scale))·(c/scale)·scale: the cap applies to raw scores as c/scale
    cap = np.float32(softcap / scale) if softcap > 0 else np.float32(0.0)
    scale = np.float32(scale)
    for b0, g in tasks:
        b1 = min(b0 + QUERY_BLOCK, t)
        nb = b1 - b0
        k0 = max(0, pos0 + b0 - window + 1) if window > 0 else 0
        k1 = pos0 + b1
        heads_g = slice(g * group, (g + 1) * group)
        qb = np.ascontiguousarray(q[b0:b1, heads_g].transpose(1, 0, 2)).reshape(group * nb, d)
        s = (qb @ keys[g, k0:k1].T).reshape(group, nb, k1 - k0)
        mask_scores(s, pos0 + b0, k0, window, cap)
        p = np.empty_like(s)
        sums = np.empty((group, nb), np.float32)
        softmax_weights(s, s.max(axis=2), pos0 + b0, k0, window, scale, p, sums)
        o = (p.reshape(group * nb, k1 - k0) @ values[g, k0:k1]).reshape(group, nb, d)
        o /= sums[:, :, None]
        out[b0:b1, heads_g] = o.transpose(1, 0, 2)
