"""The compact embedding / head kinds (spec/FORMAT.md §3.4) in the runtime: the numba kernels against the float64
numpy reference on odd shapes (vocabularies and ranks not multiples of 32; hidden sizes a multiple of 32 only where
Q4_0 needs it), serial and parallel, one token and several; the reference against the spec's formulas."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from nqfmt import BinaryPath, FactoredLinear, open_nq, pack_signs, unpack_signs
from nqfmt import keys as K
from nqfmt.keys import GGMLType
from nqfmt.q4 import quantize_iq4_nl, quantize_q4_0, unpack_q4
from runtime.backends import get_backend
from runtime.backends import numba_lut16 as lut16
from runtime.backends import numba_tables as nt
from runtime.backends.numba_cpu import NumbaBackend
from runtime.model import Model

REL = 1e-4


def readonly(a):
    a.setflags(write=False)
    return a


def close(fast, ref, rel=REL):
    return np.abs(fast - ref).max() <= rel * np.abs(ref).max()


@pytest.fixture(scope="module", params=[1, 2], ids=["serial", "parallel"])
def backends(request):
    return get_backend("numba", threads=request.param, exact=True), get_backend("numpy")


@pytest.fixture(scope="module", params=[(1, False), (2, False)] + [(1, True), (2, True)] * lut16.available(),
                ids=lambda p: f"{p[0]}thr-{'lut16' if p[1] else 'portable'}")
def q4_backends(request):
    threads, simd = request.param
    return NumbaBackend(threads=threads, exact=True, simd=simd), get_backend("numpy")


def q4_table(rng, vocab, hidden, gtype):
    values = rng.standard_normal((vocab, hidden)) * rng.uniform(0.1, 2.0, (vocab, 1))
    return readonly((quantize_q4_0 if gtype == GGMLType.Q4_0 else quantize_iq4_nl)(values))


@pytest.mark.parametrize("gtype", [GGMLType.Q4_0, GGMLType.IQ4_NL])
@pytest.mark.parametrize("vocab,hidden", [(203, 96), (37, 32), (1000, 576)])
@pytest.mark.parametrize("tokens", [1, 3, 21])
def test_4bit_embed_and_head(q4_backends, vocab, hidden, tokens, gtype):
    fast, ref = q4_backends
    rng = np.random.default_rng(vocab + tokens)
    raw = q4_table(rng, vocab, hidden, gtype)
    tf, tr = fast.prepare_embedding(raw, gtype, hidden), ref.prepare_embedding(raw, gtype, hidden)
    assert (tf.tiles is not None) == fast.simd  # the LUT-16 head where the backend has it, else the portable one
    ids = rng.integers(0, vocab, tokens)
    want_rows = dequantize(raw, GGMLQuantizationType(gtype))[ids]  # gguf's reference decoder: the spec's layout
    np.testing.assert_array_equal(tr.rows(ids), want_rows.astype(np.float64))
    np.testing.assert_array_equal(fast.embed(tf, ids), want_rows.astype(np.float32))
    x = rng.standard_normal((tokens, hidden))
    want = ref.head(tr, x)
    np.testing.assert_allclose(want, x @ dequantize(raw, GGMLQuantizationType(gtype)).astype(np.float64).T,
                               rtol=1e-12)
    assert close(fast.head(tf, x.astype(np.float32)), want)


@pytest.mark.parametrize("pshufb", [False] + [True] * nt.ssse3(), ids=lambda p: "pshufb" if p else "floats")
@pytest.mark.parametrize("gtype", [GGMLType.Q4_0, GGMLType.IQ4_NL])
@pytest.mark.parametrize("vocab,hidden", [(203, 96), (37, 32), (515, 576)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_4bit_head_without_lut16_both_code_readers(vocab, hidden, gtype, pshufb, tokens):
    """Without LUT-16 the 4-bit head reads a row's codes by pshufb where the CPU has SSSE3, else through the float
    grid: one token's row products and several tokens' widened rows, against float64, serial and parallel."""
    rng = np.random.default_rng(vocab * hidden + tokens)
    raw = q4_table(rng, vocab, hidden, gtype)
    table = nt.q4_table(raw, gtype, hidden, tiles=False)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    want = x.astype(np.float64) @ dequantize(raw, GGMLQuantizationType(gtype)).astype(np.float64).T
    for parallel in (False, True):
        out = np.full((tokens, vocab), np.nan, np.float32)
        nt._kernels(parallel, pshufb).head_q4(table.raw, table.scales, table.grid, table.codes, x, out)
        assert close(out, want, rel=1e-5)


def factored_table(rng, vocab, hidden, ranks, mid):
    paths = []
    for r in ranks:
        paths.append(BinaryPath(readonly(pack_signs(rng.standard_normal((r, hidden)))),
                                readonly(pack_signs(rng.standard_normal((vocab, r)))),
                                rng.uniform(0.5, 1.5, hidden).astype(np.float16),
                                (rng.uniform(-1.5, 1.5, vocab) / np.sqrt(r)).astype(np.float16),
                                rng.uniform(0.5, 1.5, r).astype(np.float16) if mid else None, r))
    return FactoredLinear(vocab, hidden, tuple(paths), None)


def spec_rows(table: FactoredLinear) -> np.ndarray:
    """The whole table by spec §3.4's formula, float64."""
    w = np.zeros((table.m, table.n))
    for p in table.paths:
        u = unpack_signs(p.u_signs, p.rank, np.float64)
        if p.scale_mid is not None:
            u = u * p.scale_mid.astype(np.float64)
        w += p.scale_out.astype(np.float64)[:, None] * (u @ unpack_signs(p.v_signs, table.n, np.float64)) \
            * p.scale_in.astype(np.float64)
    return w


@pytest.mark.parametrize("vocab,hidden,ranks,mid", [(203, 72, (40, 9), True), (91, 100, (61,), False),
                                                     (1000, 576, (576,), False)])
@pytest.mark.parametrize("tokens", [1, 3, 21])
def test_factored_embed_and_head(backends, vocab, hidden, ranks, mid, tokens):
    fast, ref = backends
    rng = np.random.default_rng(vocab * 7 + tokens)
    table = factored_table(rng, vocab, hidden, ranks, mid)
    tf, tr = fast.prepare_factored_table(table), ref.prepare_factored_table(table)
    ids = rng.integers(0, vocab, tokens)
    dense = spec_rows(table)
    np.testing.assert_allclose(tr.rows(ids), dense[ids], rtol=1e-12, atol=1e-12)
    assert close(fast.embed(tf, ids), dense[ids])
    x = rng.standard_normal((tokens, hidden))
    want = ref.head(tr, x)
    np.testing.assert_allclose(want, x @ dense.T, rtol=1e-10, atol=1e-10)
    assert close(fast.head(tf, x.astype(np.float32)), want)


def test_factored_table_widens_v_once_per_path(backends):
    fast, _ = backends
    table = factored_table(np.random.default_rng(3), 50, 40, (17, 5), True)
    prepared = fast.prepare_factored_table(table)
    assert isinstance(prepared, nt.FactoredTable) and prepared.hidden == 40
    assert [p[1].shape for p in prepared.paths] == [(17, 40), (5, 40)]
    assert prepared.linear.m == 50 and prepared.linear.n == 40


@pytest.mark.parametrize("variant", ["llama-q4", "qwen2-q4", "gemma3-iq4", "llama-binary-table",
                                     "qwen2-binary-table"])
def test_model_with_a_compact_table_reports_its_kind(variant_files, variant):
    nq = open_nq(variant_files[variant])
    model = Model(nq, get_backend("numba", threads=1, exact=True))
    kind = nq.tables[K.EMBD_TABLE]
    assert model.embedding_type == (kind.name if isinstance(kind, GGMLType) else
                                    f"binary-factored, ranks {list(kind.ranks)}")
    ids = np.arange(5) % nq.config.vocab
    logits = model.forward(ids, 0, model.new_cache(8), all_logits=True)
    assert logits.shape == (5, nq.config.vocab) and np.isfinite(logits).all()


def test_model_refuses_a_q4_0_table_with_a_nonfinite_scale(tmp_path):
    from synthetic import tiny_config, write_random
    from nqfmt import NQFormatError
    path = tmp_path / "m.nq"
    write_random(path, tiny_config(hidden=64), embedding_type=GGMLType.Q4_0)
    nq = open_nq(path)
    at = nq.tensors[K.TOKEN_EMBD].offset + 18 * 5  # the scale of block 5 (row 2, block 1)
    del nq
    data = bytearray(path.read_bytes())
    data[at:at + 2] = np.array([np.inf], np.float16).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(NQFormatError, match="'token_embd.weight': non-finite values"):
        Model(open_nq(path), get_backend("numpy"))


@pytest.mark.parametrize("gtype", [GGMLType.Q4_0, GGMLType.IQ4_NL])
@pytest.mark.parametrize("vocab,hot_rows", [(203, 1), (203, 77), (1000, 999)])
@pytest.mark.parametrize("tokens", [1, 3, 130])
def test_hot_rows_embed_and_head(q4_backends, vocab, hot_rows, tokens, gtype):
    """A 4-bit table with hot rows (spec §3.4): every row from the part that holds it, every logit in its token's
    place, whichever head path the token count takes."""
    fast, ref = q4_backends
    hidden = 96
    rng = np.random.default_rng(vocab + hot_rows + tokens)
    hot_ids = np.sort(rng.choice(vocab, hot_rows, replace=False))
    cold = q4_table(rng, vocab - hot_rows, hidden, gtype)
    hot = readonly(quantize(rng.standard_normal((hot_rows, hidden)), GGMLQuantizationType.Q8_0))
    full = np.empty((vocab, hidden))  # the spec's rule, spelled out: hot rows by id, the rest in token order
    others = np.setdiff1d(np.arange(vocab), hot_ids)
    full[hot_ids] = dequantize(hot, GGMLQuantizationType.Q8_0)
    full[others] = dequantize(cold, GGMLQuantizationType(gtype))
    tf, tr = (b.prepare_hot_table(cold, gtype, hot_ids, hot, vocab, hidden) for b in (fast, ref))
    ids = np.concatenate([hot_ids[:2], others[:2], rng.integers(0, vocab, tokens)])[:max(tokens, 4)]
    np.testing.assert_array_equal(tr.rows(ids), full[ids])
    np.testing.assert_array_equal(fast.embed(tf, ids), full[ids].astype(np.float32))
    x = rng.standard_normal((tokens, hidden))
    want = ref.head(tr, x)
    np.testing.assert_allclose(want, x @ full.T, rtol=1e-12, atol=1e-12)
    assert close(fast.head(tf, x.astype(np.float32)), want)


@pytest.mark.skipif(not lut16.available(), reason="the LUT-16 kernels need AVX-512")
def test_4bit_repack_matches_the_documented_layout():
    rng = np.random.default_rng(5)
    rows, d = 45, 96
    raw = q4_table(rng, rows, d, GGMLType.IQ4_NL)
    scales, codes = unpack_q4(raw)
    tiles, scale_tiles = lut16.repack_q4(raw, scales.astype(np.float32))
    words = np.zeros((rows, d // 8), np.uint64)
    for k in range(8):  # nibble k of word w: the code at position 8w + k
        words |= codes[:, k::8].astype(np.uint64) << np.uint64(4 * k)
    want = np.zeros((3, d // 8, 16), np.uint32)
    want_scales = np.zeros((3, d // 32, 16), np.float32)
    for i in range(rows):
        want[i // 16, :, i % 16] = words[i]
        want_scales[i // 16, :, i % 16] = scales[i]
    np.testing.assert_array_equal(tiles, want)
    np.testing.assert_array_equal(scale_tiles, want_scales)
    x = rng.standard_normal((1, d)).astype(np.float32)
    out = np.empty((1, rows), np.float32)
    lut16.head_q4_serial(tiles, scale_tiles, nt.GRIDS[GGMLType.IQ4_NL].astype(np.float32), x, out)
    want = x.astype(np.float64) @ dequantize(raw, GGMLQuantizationType.IQ4_NL).astype(np.float64).T
    assert close(out, want)
