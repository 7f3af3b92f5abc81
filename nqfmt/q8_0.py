"""GGML's Q8_0 blocks (spec/FORMAT.md §3.3): per 32 values, an F16 scale d then 32 int8 q; value = d·q."""
from __future__ import annotations

import numpy as np

BLOCK, BLOCK_BYTES = 32, 34


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """Rows of Q8_0 bytes (rows, cols/32·34) → float32 (rows, cols). The slow, obvious reference."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, BLOCK_BYTES)
    d = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, :, 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(rows, -1)
