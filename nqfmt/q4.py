"""GGML's 4-bit blocks of 32 (spec/FORMAT.md §3.4): an F16 scale d then 16 bytes of nibbles; byte j holds value j in
its low nibble and value j + 16 in its high nibble, an index q in 0..15 into the type's grid; value = d·grid[q].
Q4_0's grid is q − 8 (uniform); IQ4_NL's is a fixed non-linear one, denser near zero where weights are."""
from __future__ import annotations

import numpy as np

from .keys import GGMLType

BLOCK, BLOCK_BYTES = 32, 18
GRIDS: dict[GGMLType, np.ndarray] = {
    GGMLType.Q4_0: np.arange(-8, 8, dtype=np.int8),
    GGMLType.IQ4_NL: np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8),
}


def pack_q4(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Scales d (rows, cols/32) and indices q (rows, cols) in 0..15 → 4-bit block bytes (rows, cols/32·18)."""
    rows, cols = q.shape
    if cols % BLOCK or d.shape != (rows, cols // BLOCK):
        raise ValueError(f"pack_q4: indices {q.shape} and scales {d.shape} are not whole blocks of {BLOCK}")
    codes = np.asarray(q, dtype=np.uint8).reshape(rows, -1, BLOCK)
    if codes.max(initial=0) > 15:
        raise ValueError("pack_q4: indices must lie in 0..15")
    out = np.empty((rows, cols // BLOCK, BLOCK_BYTES), np.uint8)
    out[:, :, :2] = np.ascontiguousarray(d, dtype=np.float16).view(np.uint8).reshape(rows, -1, 2)
    out[:, :, 2:] = codes[:, :, :16] | (codes[:, :, 16:] << 4)
    return out.reshape(rows, -1)


def unpack_q4(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-bit block bytes (rows, cols/32·18) → (scales d as float16 (rows, cols/32), indices q as uint8 (rows, cols))."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, BLOCK_BYTES)
    d = blocks[:, :, :2].copy().view(np.float16)[:, :, 0]
    nib = blocks[:, :, 2:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=2)
    return d, q.reshape(rows, -1)


def dequantize_q4(raw: np.ndarray, gtype: GGMLType) -> np.ndarray:
    """Rows of Q4_0 or IQ4_NL bytes → float32 (rows, cols): float32(d)·float32(grid[q]), one rounding. The slow,
    obvious reference."""
    d, q = unpack_q4(raw)
    rows = raw.shape[0]
    values = d.astype(np.float32)[:, :, None] * GRIDS[gtype][q.reshape(rows, -1, BLOCK)].astype(np.float32)
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
    return pack_q4(d.astype(np.float16), q.reshape(rows, -1))


def quantize_iq4_nl(values: np.ndarray) -> np.ndarray:
    """float rows → IQ4_NL bytes by the plain rule (d = the signed value of largest magnitude / −127, each value to
    its nearest grid point); for tests and tools."""
    x = np.asarray(values, dtype=np.float32)
    rows = x.shape[0]
    blocks = x.reshape(rows, -1, BLOCK)
    idx = np.abs(blocks).argmax(axis=2)
    peak = np.take_along_axis(blocks, idx[:, :, None], axis=2)[:, :, 0]
    d = (peak / -127).astype(np.float16)
    df = d.astype(np.float32)[:, :, None]
    grid = GRIDS[GGMLType.IQ4_NL].astype(np.float32)
    scaled = np.divide(blocks, df, out=np.zeros_like(blocks), where=df != 0)
    q = np.abs(scaled[..., None] - grid).argmin(axis=-1).astype(np.uint8)
    return pack_q4(d, q.reshape(rows, -1))
