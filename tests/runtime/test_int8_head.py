"""The int8 head (numba_int8.py) against a float64 reference that quantizes the token the same way: absmax / 127
per block of 32, rounded to nearest even; then Σ_b d·grid·xq·xs in float64. Odd vocabularies (not multiples of 16),
one token and several, serial and parallel, every table type it serves; the backend picks it by default and keeps
every product in float32 with exact=True."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from nqfmt.keys import GGMLType
from nqfmt.q4 import quantize_iq4_nl, quantize_q4_0
from runtime.backends import get_backend
from runtime.backends.numba_cpu import NumbaBackend

pytestmark = pytest.mark.skipif(not NumbaBackend(threads=1).int8_head,
                                reason="the int8 head runs with VNNI on AVX-512 CPUs, with AVX2 on CPUs without AVX-512")

TABLES = {GGMLType.Q4_0: quantize_q4_0, GGMLType.IQ4_NL: quantize_iq4_nl,
          GGMLType.Q8_0: lambda v: quantize(v.astype(np.float32), GGMLQuantizationType.Q8_0)}


def quantized_tokens(x: np.ndarray) -> np.ndarray:
    """x (T, d) float32 as the int8 head sees it, in float64: per block of 32, rint(x·127/absmax)·absmax/127."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), np.float32(0.0)).astype(np.float32)
    q = np.rint(blocks * inv)
    return (q.astype(np.float64) * (amax / np.float32(127.0)).astype(np.float64)).reshape(x.shape)


def table(rng, gtype, vocab, hidden):
    values = rng.standard_normal((vocab, hidden)) * rng.uniform(0.1, 2.0, (vocab, 1))
    raw = TABLES[gtype](values)
    raw.setflags(write=False)  # as the memory-mapped file's views
    return raw


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("gtype", list(TABLES))
@pytest.mark.parametrize("vocab,hidden,tokens", [(203, 96, 1), (203, 96, 5), (1000, 576, 3), (37, 32, 1), (203, 96, 9)])
def test_int8_head_matches_quantized_token_reference(threads, gtype, vocab, hidden, tokens):
    rng = np.random.default_rng(vocab + hidden + tokens)
    raw = table(rng, gtype, vocab, hidden)
    backend = get_backend("numba", threads=threads)
    assert backend.int8_head
    prepared = backend.prepare_embedding(raw, gtype, hidden)
    x = (rng.standard_normal((tokens, hidden)) * rng.uniform(0.01, 3.0, (1, hidden))).astype(np.float32)
    got = backend.head(prepared, x)
    rows = dequantize(raw, GGMLQuantizationType(gtype)).astype(np.float64)
    want = quantized_tokens(x) @ rows.T
    assert got.shape == (tokens, vocab) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    exact = rows @ x.astype(np.float64).T
    assert not np.allclose(got, exact.T, rtol=0, atol=1e-6 * np.abs(exact).max())  # the quantized path really ran


def test_exact_keeps_float32_and_zero_blocks_stay_zero():
    rng = np.random.default_rng(3)
    raw = table(rng, GGMLType.IQ4_NL, 203, 96)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    x[1, 32:64] = 0.0  # an all-zero block: scale 0, no division by zero
    rows = dequantize(raw, GGMLQuantizationType.IQ4_NL).astype(np.float64)
    exact = NumbaBackend(threads=1, exact=True)
    assert not exact.int8_head
    got = exact.head(exact.prepare_embedding(raw, GGMLType.IQ4_NL, 96), x)
    assert np.abs(got - x.astype(np.float64) @ rows.T).max() <= 1e-5 * np.abs(got).max()
    fast = NumbaBackend(threads=1)
    got = fast.head(fast.prepare_embedding(raw, GGMLType.IQ4_NL, 96), x)
    assert np.isfinite(got).all()
    assert np.abs(got - quantized_tokens(x) @ rows.T).max() <= 1e-5 * np.abs(got).max()


@pytest.mark.parametrize("gtype", [GGMLType.IQ4_NL, GGMLType.Q8_0])
def test_a_tokens_logits_do_not_depend_on_the_tokens_beside_it(gtype):
    """Tokens run four at a time (q8_tile_group) and the rest one by one; each token's logits are the same bits
    whichever way it ran, so a batched decoding step returns what each sequence alone would."""
    rng = np.random.default_rng(11)
    raw = table(rng, gtype, 203, 96)
    backend = get_backend("numba", threads=1)
    prepared = backend.prepare_embedding(raw, gtype, 96)
    x = rng.standard_normal((9, 96)).astype(np.float32)
    together = backend.head(prepared, x)
    for t in range(9):
        assert np.array_equal(backend.head(prepared, x[t:t + 1])[0], together[t])
    assert np.array_equal(backend.head(prepared, x[4:6]), together[4:6])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 5, 9])
def test_hot_rows_head_writes_each_parts_logits_in_their_tokens_places(threads, tokens):
    """A hot-row table's two parts (IQ4_NL and Q8_0) write their logits straight into the vocabulary's columns:
    the same values as each part's own head, at the ids the spec's rule gives them."""
    rng = np.random.default_rng(tokens)
    vocab, hidden = 203, 96
    hot_ids = np.sort(rng.choice(vocab, 77, replace=False))
    others = np.setdiff1d(np.arange(vocab), hot_ids)
    cold, hot = table(rng, GGMLType.IQ4_NL, vocab - 77, hidden), table(rng, GGMLType.Q8_0, 77, hidden)
    backend = get_backend("numba", threads=threads)
    prepared = backend.prepare_hot_table(cold, GGMLType.IQ4_NL, hot_ids, hot, vocab, hidden)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    got = backend.head(prepared, x)
    want = np.full((tokens, vocab), np.nan, np.float32)
    want[:, others] = backend.head(prepared.cold, x)
    want[:, hot_ids] = backend.head(prepared.hot, x)
    assert np.array_equal(got, want)


def test_extreme_q8_values_are_exact():
    """Q8_0 values at −128 and 127 against tokens at ±127: the AVX2 path's |w|·(x·sign w) pairs reach 2·128·127 without
    saturating int16, and −128 keeps its magnitude; VNNI's offset bytes cover the same range."""
    rng = np.random.default_rng(5)
    raw = table(rng, GGMLType.Q8_0, 53, 64).reshape(53, 2, 34).copy()
    values = raw[:, :, 2:].view(np.int8)
    values[::2] = rng.choice(np.array([-128, 127, -127], np.int8), values[::2].shape)
    raw = raw.reshape(53, -1)
    x = np.where(rng.random((3, 64)) < 0.5, -1.0, 1.0).astype(np.float32) * 2.5  # every value quantizes to ±127
    backend = get_backend("numba", threads=1)
    assert backend.int8_head
    got = backend.head(backend.prepare_embedding(raw, GGMLType.Q8_0, 64), x)
    want = quantized_tokens(x) @ dequantize(raw, GGMLQuantizationType.Q8_0).astype(np.float64).T
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
