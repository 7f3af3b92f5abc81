"""Sign packing: 32 signs per little-endian uint32 word, lowest bit = lowest column, bit 1 = -1, rows padded with 0."""
from __future__ import annotations

import numpy as np


def words_per_row(cols: int) -> int:
    return (cols + 31) // 32


def pack_signs(signs: np.ndarray) -> np.ndarray:
    """Pack a 2-D array of signs (any real or bool dtype; negative or True-as-negative means -1) into uint32 words.

    Zero counts as +1, as sign(0) must still pick a side. Bool input means "is negative".
    """
    s = np.asarray(signs)
    if s.ndim != 2:
        raise ValueError(f"pack_signs expects a 2-D array, got shape {s.shape}")
    rows, cols = s.shape
    neg = s if s.dtype == np.bool_ else (s < 0)
    padded = np.zeros((rows, words_per_row(cols) * 32), dtype=np.bool_)
    padded[:, :cols] = neg
    packed = np.packbits(padded, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").reshape(rows, -1)


def unpack_signs(words: np.ndarray, cols: int, dtype: np.dtype = np.float32) -> np.ndarray:
    """Inverse of pack_signs: words (rows, ceil(cols/32)) as uint32 or int32 -> ±1 array (rows, cols) of `dtype`."""
    w = np.ascontiguousarray(words)
    if w.ndim != 2 or w.shape[1] != words_per_row(cols):
        raise ValueError(f"unpack_signs: words of shape {w.shape} cannot hold {cols} columns")
    bits = np.unpackbits(w.view("<u4").view(np.uint8).reshape(w.shape[0], -1), axis=1, bitorder="little")[:, :cols]
    return (1 - 2 * bits.astype(np.int8)).astype(dtype)


def padding_is_clear(words: np.ndarray, cols: int) -> bool:
    """True when the bits past column `cols` in every row's last word are 0, as the spec requires."""
    tail = cols % 32
    if tail == 0 or words.shape[0] == 0:
        return True
    mask = np.uint32((0xFFFFFFFF << tail) & 0xFFFFFFFF)
    return not np.any(words[:, -1].view(np.uint32) & mask)
