"""Hot-row tables (spec/FORMAT.md §3.4) on the host backends: a 4-bit table of the other rows and a Q8_0 table of
the frequent ones, each prepared by the backend as the dense table it is; rows and logits are gathered from the two.

The embedding looks every token up in the table that holds it; the head runs both tables' heads and scatters their
logits to the tokens' places (V floats per token: a small cost beside the head itself)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from nqfmt.layout import cold_ids


@dataclass(frozen=True)
class HotRowsTable:
    cold: Any  # the backend's prepared 4-bit table of the other rows
    hot: Any  # its prepared Q8_0 table of the hot rows
    hot_ids: np.ndarray  # (K,) int64, increasing
    cold_ids: np.ndarray  # (V − K,) int64, increasing
    slot: np.ndarray  # (V,) int64: a token's row in the table that holds it
    is_hot: np.ndarray  # (V,) bool
    hidden: int


def hot_rows_table(cold: Any, hot: Any, hot_ids: np.ndarray, vocab: int, hidden: int) -> HotRowsTable:
    others = cold_ids(hot_ids, vocab)
    is_hot = np.ones(vocab, bool)
    is_hot[others] = False
    slot = np.empty(vocab, np.int64)
    slot[others] = np.arange(len(others))
    slot[hot_ids] = np.arange(len(hot_ids))
    return HotRowsTable(cold, hot, np.asarray(hot_ids, np.int64), others, slot, is_hot, hidden)


def embed(backend: Any, table: HotRowsTable, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of the table through backend.embed of each part, (T, hidden)."""
    ids = np.asarray(ids, np.int64)
    hot = table.is_hot[ids]
    out = np.empty((len(ids), table.hidden), backend.dtype)
    for part, where in ((table.cold, ~hot), (table.hot, hot)):
        if where.any():
            out[where] = backend.embed(part, table.slot[ids[where]])
    return out


def head(backend: Any, table: HotRowsTable, x: np.ndarray) -> np.ndarray:
    """Logits (T, V) through backend.head of each part, scattered to the tokens' places."""
    cold, hot = backend.head(table.cold, x), backend.head(table.hot, x)
    out = np.empty((x.shape[0], len(table.is_hot)), cold.dtype)
    out[:, table.cold_ids] = cold
    out[:, table.hot_ids] = hot
    return out
