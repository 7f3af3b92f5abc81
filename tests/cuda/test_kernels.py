"""Each cuda-backend kernel against the float64 numpy reference backend, on fresh random inputs with shapes that are
not multiples of 32 and outputs poisoned with NaN beforehand (an unwritten element fails). Runs on the emulating
device everywhere and on the GPU where there is one (conftest.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from nqfmt.keys import GGMLType
from gguf.quants import quantize

from nqfmt import BinaryPath, FactoredLinear, pack_signs, unpack_signs
from runtime.backends.cuda import MAX_KSPLIT, TOPK, _ceil
from runtime.backends.numpy_ref import NumpyBackend
from runtime.model import rope_inv_freq
from runtime.sampling import Sampler, SamplingParams
from nqfmt.q4 import quantize_iq4_nl
from synthetic import tiny_config

REF = NumpyBackend()
REL = 1e-5  # float32 arithmetic lands near 1e-7 relative to the largest output


def close(got, want, rel=REL):
    got = np.asarray(got, dtype=np.float64)
    return got.shape == want.shape and np.all(np.isfinite(got)) and np.abs(got - want).max() <= rel * np.abs(want).max()


def poisoned(be, shape):
    return be.xp.full(shape, np.nan, np.float32)


def host(be, a):
    return be.device.to_host(a)


def dev(be, a):
    return be.device.to_device(np.asarray(a, dtype=np.float32))


def random_linear(rng, m, n, ranks, mid, bias):
    paths = tuple(BinaryPath(pack_signs(rng.standard_normal((r, n))), pack_signs(rng.standard_normal((m, r))),
                             rng.uniform(0.5, 1.5, n).astype(np.float16), rng.uniform(-1.5, 1.5, m).astype(np.float16),
                             rng.uniform(0.5, 1.5, r).astype(np.float16) if mid else None, r) for r in ranks)
    return FactoredLinear(m, n, paths, rng.standard_normal(m).astype(np.float32) if bias else None)


def fragment_signs(a: np.ndarray, rows: int, cols: int, chunks_total: int, chunk_offset: int) -> np.ndarray:
    """±1 (rows, cols) read back from fragment-order words, decoding binary.cu's layout comment independently."""
    words = a.reshape(-1, chunks_total, 32)
    out = np.zeros((rows, cols))
    for i in range(16):
        w, rsel, sidx = i >> 3, (i >> 2) & 1, i & 3
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            s = 8 * (sidx >> 1) + 2 * t + (sidx & 1)
            for tile in range(words.shape[0]):
                row = 16 * tile + g + 8 * rsel
                for chunk in range(_ceil(cols, 64)):
                    word = int(words[tile, chunk_offset + chunk, lane])
                    for bit, col in ((15 - i, 64 * chunk + 32 * w + 15 - s), (31 - i, 64 * chunk + 32 * w + 31 - s)):
                        if row < rows and col < cols:
                            out[row, col] = -1.0 if (word >> bit) & 1 else 1.0
                        else:
                            assert (word >> bit) & 1 == 0, "padding must hold +1 signs"
    return out


def test_repack_matches_the_documented_layout(backend):
    rng = np.random.default_rng(1)
    lin = random_linear(rng, 37, 75, (29, 5), True, False)
    w = backend.prepare_linear(lin)
    a1, a2 = host(backend, w.a1), host(backend, w.a2)
    for p, path in enumerate(lin.paths):
        r = path.rank
        v_words = a1.reshape(-1, w.k1_chunks, 32)[w.seg[p] * 4:w.seg[p + 1] * 4]
        assert np.array_equal(fragment_signs(v_words, r, 75, w.k1_chunks, 0), unpack_signs(path.v_signs, 75))
        assert np.array_equal(fragment_signs(a2, 37, r, w.k2_chunks, w.seg[p]), unpack_signs(path.u_signs, r))


CASES = [(91, 100, (37,), False, False), (45, 203, (61, 7), True, True), (33, 8, (8,), True, False),
         (150, 777, (97, 33, 70), True, True)]


@pytest.mark.parametrize("m,n,ranks,mid,bias", CASES)
def test_binary_gemv_every_split(backend, m, n, ranks, mid, bias):
    rng = np.random.default_rng(m * n)
    lin = random_linear(rng, m, n, ranks, mid, bias)
    w = backend.prepare_linear(lin)
    x = rng.standard_normal((1, n))
    want = REF.linear(lin, x)
    for ksplit in range(1, MAX_KSPLIT + 1):
        y = poisoned(backend, (1, m))
        backend.gemv_into(dataclasses.replace(w, ksplit=ksplit), dev(backend, x), y)
        assert close(host(backend, y), want), ksplit
        assert not host(backend, w.counters).any(), "the phase counters must be left at zero"


@pytest.mark.parametrize("m,n,ranks,mid,bias", CASES[:3])
@pytest.mark.parametrize("tokens", [2, 37])
def test_binary_gemm(backend, m, n, ranks, mid, bias, tokens):
    rng = np.random.default_rng(m * n + tokens)
    lin = random_linear(rng, m, n, ranks, mid, bias)
    x = rng.standard_normal((tokens, n))
    y = poisoned(backend, (tokens, m))
    backend.gemm_into(backend.prepare_linear(lin), dev(backend, x), y)
    assert close(host(backend, y), REF.linear(lin, x))


def test_rms_norm_in_place(backend):
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((5, 3, 23)), rng.uniform(0.5, 1.5, 23)
    xd = dev(backend, x)
    backend.rms_norm_into(xd, dev(backend, w), 1e-6, xd)
    assert close(host(backend, xd), REF.rms_norm(x, w, 1e-6))


def test_rope_table_and_rope(backend):
    cfg = tiny_config("llama", rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                      rope_high_freq_factor=4.0, rope_original_context=32)
    inv = rope_inv_freq(cfg, False)
    tokens, pos0, half = 7, 1234, len(inv)
    angles = (np.arange(pos0, pos0 + tokens)[:, None].astype(np.float32) * inv[None, :]).astype(np.float64)
    pos = backend.device.to_device(np.array([pos0], np.int32))
    cos, sin = poisoned(backend, (tokens, half)), poisoned(backend, (tokens, half))
    backend.rope_table_into(pos, dev(backend, inv), tokens, cos, sin)
    assert np.array_equal(host(backend, cos), np.cos(angles).astype(np.float32))
    assert np.array_equal(host(backend, sin), np.sin(angles).astype(np.float32))
    x = np.random.default_rng(3).standard_normal((tokens, 3, 2 * half))
    out = poisoned(backend, x.shape)
    backend.rope_into(dev(backend, x), cos, sin, out)
    assert close(host(backend, out), REF.rope(x, np.cos(angles), np.sin(angles)))


@pytest.mark.parametrize("window,softcap,d", [(0, 0.0, 10), (5, 0.0, 10), (0, 3.0, 10), (0, 0.0, 200), (3, 2.0, 38)])
def test_attention_over_cache(backend, window, softcap, d):
    """Prefill 13, one decode step, then 4 more tokens; the prefill crosses a tile of 128 keys when long."""
    cfg = tiny_config("llama", n_heads=6, n_kv_heads=2, head_dim=d)
    rng = np.random.default_rng(7)
    caches = backend.kv_cache(cfg, 180), REF.kv_cache(cfg, 180)
    for pos0, t in ((0, 13), (13, 1), (14, 140), (154, 4)):
        q, k, v = (rng.standard_normal((t, h, d)) for h in (6, 2, 2))
        want = REF.attention(caches[1], 1, q, k, v, pos0, window, 0.3, softcap)
        out = poisoned(backend, (t, 6 * d))
        backend._pos.fill(pos0)
        backend.attention_into(caches[0], 1, dev(backend, q), dev(backend, k), dev(backend, v), backend._pos, window,
                               0.3, softcap, out)
        assert close(host(backend, out), want)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_glu(backend, activation):
    rng = np.random.default_rng(4)
    gate, up = rng.standard_normal((3, 101)) * 3, rng.standard_normal((3, 101))
    out = poisoned(backend, gate.shape)
    backend.glu_into(dev(backend, gate), dev(backend, up), activation, out)
    assert close(host(backend, out), REF.glu(gate, up, activation))


@pytest.mark.parametrize("gtype,hidden", [(GGMLType.F16, 96), (GGMLType.F16, 75), (GGMLType.F32, 96), (GGMLType.F32, 75),
                                          (GGMLType.Q8_0, 96), (GGMLType.Q4_0, 96), (GGMLType.Q4_0, 32),
                                          (GGMLType.IQ4_NL, 96)])
def test_embedding_and_head(backend, gtype, hidden):
    rng = np.random.default_rng(5)
    vocab = 203
    values = rng.standard_normal((vocab, hidden)).astype(np.float32)
    table = (quantize(values, gtype) if gtype in (GGMLType.Q8_0, GGMLType.Q4_0) else
             quantize_iq4_nl(values) if gtype == GGMLType.IQ4_NL else
             values.astype(np.float16 if gtype == GGMLType.F16 else np.float32))
    tb, tr = backend.prepare_embedding(table, gtype, hidden), REF.prepare_embedding(table, gtype, hidden)
    ids = rng.integers(0, vocab, 11)
    out = poisoned(backend, (11, hidden))
    backend.embed_into(tb, backend.device.to_device(ids.astype(np.int32)), out, 1.5)
    assert np.array_equal(host(backend, out), (tr.rows(ids) * 1.5).astype(np.float32))
    x = rng.standard_normal((6, hidden))
    logits = poisoned(backend, (6, vocab))
    backend.head_into(tb, dev(backend, x), logits)
    assert close(host(backend, logits), REF.head(tr, x))


@pytest.mark.parametrize("gtype", [GGMLType.Q4_0, GGMLType.IQ4_NL])
@pytest.mark.parametrize("tokens", [1, 6])
def test_hot_row_embedding_and_head(backend, gtype, tokens):
    """A 4-bit table with hot rows (spec/FORMAT.md §3.4): each token's row from the part that holds it, every
    logit written once, in its token's column, by one of the two parts' launches."""
    rng = np.random.default_rng(tokens)
    vocab, hidden = 203, 96
    hot_ids = np.sort(rng.choice(vocab, 13, replace=False))
    cold_ids = np.setdiff1d(np.arange(vocab), hot_ids)
    values = rng.standard_normal((vocab, hidden)).astype(np.float32)
    cold = quantize(values[cold_ids], gtype) if gtype == GGMLType.Q4_0 else quantize_iq4_nl(values[cold_ids])
    hot = quantize(values[hot_ids], GGMLType.Q8_0)
    tb = backend.prepare_hot_table(cold, gtype, hot_ids, hot, vocab, hidden)
    tr = REF.prepare_hot_table(cold, gtype, hot_ids, hot, vocab, hidden)
    ids = np.concatenate([hot_ids[:3], cold_ids[:3], rng.integers(0, vocab, 5)])
    out = poisoned(backend, (len(ids), hidden))
    backend.embed_into(tb, backend.device.to_device(ids.astype(np.int32)), out, 1.5)
    assert np.array_equal(host(backend, out), (tr.rows(ids) * 1.5).astype(np.float32))
    x = rng.standard_normal((tokens, hidden))
    logits = poisoned(backend, (tokens, vocab))
    backend.head_into(tb, dev(backend, x), logits)
    assert close(host(backend, logits), REF.head(tr, x))


@pytest.mark.parametrize("vocab,hidden,ranks,mid", [(203, 72, (40, 9), True), (91, 100, (61,), False)])
@pytest.mark.parametrize("tokens", [1, 6])
def test_factored_embedding_and_head(backend, vocab, hidden, ranks, mid, tokens):
    """A binary-factored table (spec/FORMAT.md §3.4): rows from its float32 expansion, the head through the binary
    linear kernels (binary_gemv for one token, binary_gemm for several)."""
    rng = np.random.default_rng(vocab + tokens)
    table = random_linear(rng, vocab, hidden, ranks, mid, False)
    tb, tr = backend.prepare_factored_table(table), REF.prepare_factored_table(table)
    assert (tb.vocab, tb.hidden) == (vocab, hidden)
    ids = rng.integers(0, vocab, 11)
    out = poisoned(backend, (11, hidden))
    backend.embed_into(tb, backend.device.to_device(ids.astype(np.int32)), out, 1.5)
    assert close(host(backend, out), tr.rows(ids) * 1.5)
    x = rng.standard_normal((tokens, hidden))
    logits = poisoned(backend, (tokens, vocab))
    backend.head_into(tb, dev(backend, x), logits)
    assert close(host(backend, logits), REF.head(tr, x))


def select(backend, logits: np.ndarray):
    """The decoder's argmax and topk launches on one logits row."""
    from runtime.backends.cuda import ARGMAX_BLOCKS, SELECT_THREADS, SORT_SIZE, i32
    xp, vocab = backend.xp, logits.shape[0]
    lg = dev(backend, logits)
    part_val, part_idx = xp.zeros(SORT_SIZE, np.float32), xp.zeros(SORT_SIZE, np.int32)
    counter, chosen = xp.zeros(1, np.int32), xp.full(1, -1, np.int32)
    backend._launch("argmax", ARGMAX_BLOCKS, SELECT_THREADS, lg, i32(vocab), part_val, part_idx, counter, chosen)
    top_val, top_idx = xp.full(TOPK, np.nan, np.float32), xp.full(TOPK, -1, np.int32)
    slice_ = max(_ceil(vocab, SORT_SIZE // TOPK), TOPK)
    backend._launch("topk", _ceil(vocab, slice_), SELECT_THREADS, lg, i32(vocab), i32(slice_), part_val, part_idx,
                    counter, top_val, top_idx)
    assert host(backend, counter)[0] == 0
    return int(host(backend, chosen)[0]), host(backend, top_idx), host(backend, top_val)


@pytest.mark.parametrize("vocab", [91, 5003, 151_936])
def test_argmax_and_topk(backend, vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal(vocab).astype(np.float32)
    logits[rng.integers(0, vocab, 40)] = logits.max()  # ties: the lowest index comes first
    chosen, ids, vals = select(backend, logits)
    order = np.lexsort((np.arange(vocab), -logits.astype(np.float64)))[:TOPK]
    assert chosen == order[0]
    k = min(TOPK, vocab)
    assert np.array_equal(ids[:k], order[:k]) and np.array_equal(vals[:k], logits[order[:k]])


@pytest.mark.parametrize("params", [dict(temperature=0.8, top_k=40, seed=1), dict(temperature=1.3, top_k=64, top_p=0.5,
                                                                                   min_p=0.0, seed=2),
                                    dict(temperature=0.0, top_k=40)])
def test_sampling_from_the_top_candidates_matches_the_sampler(backend, params):
    from runtime.backends.cuda import choose_from_top
    rng = np.random.default_rng(9)
    for _ in range(5):
        logits = (rng.standard_normal(5003) * 3).astype(np.float32)
        _, ids, vals = select(backend, logits)
        want = Sampler(SamplingParams(**params))(logits)
        assert choose_from_top(Sampler(SamplingParams(**params)), ids.astype(np.int64), vals) == want
