"""The numpy reference backend: float64, every op written the obvious way. Slow (it unpacks sign matrices on every
call) and there to be right: every fast path is tested against it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nqfmt.keys import GGMLType
from nqfmt.q4 import dequantize_q4
from nqfmt.q8_0 import dequantize_q8_0

from nqfmt import FactoredLinear, unpack_signs

from . import Backend, KVCache

_HEAD_ROWS = 4096  # vocabulary rows converted at a time, so the head never upcasts the whole table


@dataclass(frozen=True)
class Embedding:
    table: np.ndarray
    gtype: GGMLType
    hidden: int

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as float64 (the block types through nqfmt's reference dequantizers)."""
        raw = self.table[ids]
        if self.gtype == GGMLType.Q8_0:
            return dequantize_q8_0(raw).astype(np.float64).reshape(len(ids), self.hidden)
        if self.gtype in (GGMLType.Q4_0, GGMLType.IQ4_NL):
            return dequantize_q4(raw, self.gtype).astype(np.float64).reshape(len(ids), self.hidden)
        return raw.astype(np.float64)


@dataclass(frozen=True)
class HotRowsEmbedding:
    """A 4-bit table with hot rows (spec/FORMAT.md §3.4), read by the spec's formula: row t is hot[i] where
    hot_ids[i] = t, else cold[t − (number of hot ids below t)]."""

    cold: Embedding
    hot: Embedding
    hot_ids: np.ndarray
    vocab: int

    @property
    def hidden(self) -> int:
        return self.cold.hidden

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        below = np.searchsorted(self.hot_ids, ids)
        hot = (below < len(self.hot_ids)) & (self.hot_ids[np.minimum(below, len(self.hot_ids) - 1)] == ids)
        out = np.empty((len(ids), self.hidden))
        if hot.any():
            out[hot] = self.hot.rows(below[hot])
        if (~hot).any():
            out[~hot] = self.cold.rows(ids[~hot] - below[~hot])
        return out


@dataclass(frozen=True)
class FactoredTable:
    """A binary-factored embedding / head (spec/FORMAT.md §3.4): the head is `linear`, row t is
    Σ_p s_out[t]·((U[t] ⊙ s_mid)·V) ⊙ s_in."""

    linear: FactoredLinear

    @property
    def hidden(self) -> int:
        return self.linear.n

    def rows(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(ids), self.linear.n))
        for p in self.linear.paths:
            u = unpack_signs(p.u_signs[ids], p.rank, np.float64)
            if p.scale_mid is not None:
                u = u * p.scale_mid.astype(np.float64)
            v = unpack_signs(p.v_signs, self.linear.n, np.float64)
            out += p.scale_out.astype(np.float64)[ids, None] * (u @ v) * p.scale_in.astype(np.float64)
        return out


class NumpyBackend(Backend):
    name = "numpy"
    dtype = np.dtype(np.float64)

    def prepare_linear(self, linear: FactoredLinear) -> FactoredLinear:
        return linear

    def prepare_embedding(self, table: np.ndarray, gtype: GGMLType, hidden: int) -> Embedding:
        return Embedding(table, gtype, hidden)

    def prepare_factored_table(self, table: FactoredLinear) -> FactoredTable:
        return FactoredTable(table)

    def prepare_hot_table(self, cold: np.ndarray, gtype: GGMLType, hot_ids: np.ndarray, hot: np.ndarray,
                          vocab: int, hidden: int) -> HotRowsEmbedding:
        return HotRowsEmbedding(Embedding(cold, gtype, hidden), Embedding(hot, GGMLType.Q8_0, hidden),
                                np.asarray(hot_ids, np.int64), vocab)

    def embed(self, table: Embedding | HotRowsEmbedding | FactoredTable, ids: np.ndarray) -> np.ndarray:
        return table.rows(np.asarray(ids))

    def linear(self, w: FactoredLinear, x: np.ndarray) -> np.ndarray:
        y = np.zeros((x.shape[0], w.m))
        for p in w.paths:
            v = unpack_signs(p.v_signs, w.n, np.float64)  # (r, n)
            u = unpack_signs(p.u_signs, p.rank, np.float64)  # (m, r)
            h = (x * p.scale_in.astype(np.float64)) @ v.T
            if p.scale_mid is not None:
                h = h * p.scale_mid.astype(np.float64)
            y += (h @ u.T) * p.scale_out.astype(np.float64)
        if w.bias is not None:
            y += w.bias.astype(np.float64)
        return y

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        c, s = cos[:, None, :], sin[:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    def attention(self, cache: KVCache, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int,
                  window: int, scale: float, softcap: float) -> np.ndarray:
        t, heads, d = q.shape
        end = pos0 + t
        cache.k[layer, :, pos0:end] = k.transpose(1, 0, 2)
        cache.v[layer, :, pos0:end] = v.transpose(1, 0, 2)
        keys, values = cache.k[layer, :, :end], cache.v[layer, :, :end]
        group = heads // keys.shape[0]
        qpos = np.arange(pos0, end)[:, None]
        kpos = np.arange(end)[None, :]
        allowed = kpos <= qpos
        if window > 0:
            allowed &= qpos - kpos < window
        out = np.empty((t, heads, d))
        for h in range(heads):
            scores = q[:, h] @ keys[h // group].T * scale
            if softcap > 0:
                scores = softcap * np.tanh(scores / softcap)
            scores = np.where(allowed, scores, -np.inf)
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[:, h] = (p / p.sum(axis=-1, keepdims=True)) @ values[h // group]
        return out.reshape(t, heads * d)

    def glu(self, gate: np.ndarray, up: np.ndarray, activation: str) -> np.ndarray:
        if activation == "silu":
            act = gate / (1.0 + np.exp(-gate))
        else:
            act = 0.5 * gate * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (gate + 0.044715 * gate ** 3)))
        return act * up

    def head(self, table: Embedding | HotRowsEmbedding | FactoredTable, x: np.ndarray) -> np.ndarray:
        if isinstance(table, FactoredTable):
            return self.linear(table.linear, x)
        vocab = table.vocab if isinstance(table, HotRowsEmbedding) else table.table.shape[0]
        logits = np.empty((x.shape[0], vocab))
        for start in range(0, vocab, _HEAD_ROWS):
            ids = np.arange(start, min(start + _HEAD_ROWS, vocab))
            logits[:, ids] = x @ table.rows(ids).T
        return logits
