"""The output head over many tokens (`nqeval` windows, every-token logits) as BLAS matrix products.

A chunk of HEAD_ROWS vocabulary rows at a time is widened to float32 by the table's own embedding kernel (F16, F32,
Q8_0, Q4_0 or IQ4_NL, exactly as `embed` reads them) into a per-thread scratch, and one sgemm multiplies it by every
token: each row is widened once for all tokens, and the table is never widened whole. The chunks are shared among the
backend's threads (blas_workers.py). Float32 products as the loop kernels; only the order of the additions differs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .blas_workers import BlasWorkers

HEAD_ROWS = 512  # vocabulary rows widened at a time: (hidden + tokens)·512 floats of scratch per thread
MIN_TOKENS = 128  # below this many tokens the loop kernels are faster (widening a row serves too few tokens)


def head(workers: BlasWorkers, widen: Callable[[np.ndarray, np.ndarray], None], vocab: int,
         x: np.ndarray) -> np.ndarray:
    """x (T, d) float32 · tableᵀ → (T, vocab) float32, where widen(ids, out) writes table rows `ids` into out
    (len(ids), d) as float32."""
    t, d = x.shape
    logits = np.empty((t, vocab), np.float32)

    def work(starts: Sequence[int]) -> None:
        rows = np.empty((HEAD_ROWS, d), np.float32)
        products = np.empty((HEAD_ROWS, t), np.float32)
        for r0 in starts:
            n = min(r0 + HEAD_ROWS, vocab) - r0
            widen(np.arange(r0, r0 + n, dtype=np.int64), rows[:n])
            np.matmul(rows[:n], x.T, out=products[:n])  # rows · xᵀ: sgemm runs this order faster than x · rowsᵀ
            logits[:, r0:r0 + n] = products[:n].T

    workers.run(work, range(0, vocab, HEAD_ROWS))
    return logits
