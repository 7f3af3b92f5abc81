"""GGML's Q4_0 blocks (spec/FORMAT.md §3.4): per 32 values, an F16 scale d then 16 bytes of nibbles; byte j holds
value j in its low nibble and value j + 16 in its high nibble, q in 0..15, value = (q − 8)·d."""
from __future__ import annotations

import numpy as np

BLOCK, BLOCK_BYTES = 32, 18


def pack_q4_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Scales d (rows, cols/32) and codes q (rows, cols) in 0..15 → Q4_0 bytes (rows, cols/32·18)."""
    rows, cols = q.shape
    if cols % BLOCK or d.shape != (rows, cols // BLOCK):
        raise ValueError(f"pack_q4_0: codes {q.shape} and scales {d.shape} are not whole blocks of {BLOCK}")
    codes = np.asarray(q, dtype=np.uint8).reshape(rows, -1, BLOCK)
    if codes.max(initial=0) > 15:
        raise ValueError("pack_q4_0: codes must lie in 0..15")
    out = np.empty((rows, cols // BLOCK, BLOCK_BYTES), np.uint8)
    out[:, :, :2] = np.ascontiguousarray(d, dtype=np.float16).view(np.uint8).reshape(rows, -1, 2)
    out[:, :, 2:] = codes[:, :, :16] | (codes[:, :, 16:] << 4)
    return out.reshape(rows, -1)


def unpack_q4_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 bytes (rows, cols/32·18) → (scales d as float16 (rows, cols/32), codes q as uint8 (rows, cols))."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, BLOCK_BYTES)
    d = blocks[:, :, :2].copy().view(np.float16)[:, :, 0]
    nib = blocks[:, :, 2:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=2)
    return d, q.reshape(rows, -1)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """Rows of Q4_0 bytes → float32 (rows, cols): float32(d)·(q − 8), one rounding. The slow, obvious reference."""
    d, q = unpack_q4_0(raw)
    rows = raw.shape[0]
    values = d.astype(np.float32)[:, :, None] * (q.reshape(rows, -1, BLOCK).astype(np.float32) - 8)
    return values.reshape(rows, -1)


def quantize_q4_0(values: np.ndarray) -> np.ndarray:
    """float rows (rows, cols) → Q4_0 bytes with GGML's reference rule (d = the signed value of largest magnitude
    / −8, q = round-half-up of x/d + 8 clamped to 15); for tests and tools, the converter chooses its scales itself."""
    x = np.asarray(values, dtype=np.float32)
    rows = x.shape[0]
    blocks = x.reshape(rows, -1, BLOCK)
    idx = np.abs(blocks).argmax(axis=2)
    peak = np.take_along_axis(blocks, idx[:, :, None], axis=2)[:, :, 0]
    d = (peak / -8).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, (blocks * inv[:, :, None] + 8.5).astype(np.int8)).astype(np.uint8)
    return pack_q4_0(d.astype(np.float16), q.reshape(rows, -1))
