"""The batched decoding step (Model.step) and the kernels behind it, against the float64 numpy reference and against
one sequence at a time: odd shapes (not multiples of 8 or 32), sequences at different positions."""
import numpy as np
import pytest
from nqfmt.keys import GGMLType

from nqfmt import open_nq
from runtime import NQRunError
from runtime.backends import get_backend
from runtime.backends import numba_kernels as nk
from runtime.model import Model
from test_numba_backend import close, random_linear, readonly

STEP_VARIANTS = ("llama", "llama-2path-mid", "llama3-rope-q8", "mistral-sliding", "qwen2", "qwen3", "gemma3",
                 "gemma3-softcap-linear", "qwen2-q4", "llama-binary-table")


@pytest.fixture(scope="module")
def backends():
    return get_backend("numba", threads=2, exact=True), get_backend("numpy")


@pytest.mark.parametrize("m,n,ranks,mid,bias", [(91, 100, (37,), False, False), (45, 203, (61, 7), True, True),
                                                (150, 72, (40,), False, True)])
@pytest.mark.parametrize("tokens", [2, 5, 8, 11, 16])
def test_lanes_linear_matches_reference(backends, m, n, ranks, mid, bias, tokens):
    """A few tokens at once (a batched step's rows) through the backend's dispatch: the multi-token LUT kernel."""
    fast, ref = backends
    rng = np.random.default_rng(m + n + tokens)
    lin = random_linear(rng, m, n, ranks, mid, bias)
    x = rng.standard_normal((tokens, n))
    assert close(fast.linear(fast.prepare_linear(lin), x.astype(np.float32)), ref.linear(lin, x))


@pytest.mark.parametrize("kernels", [nk.SERIAL, nk.PARALLEL])
def test_lanes_kernel_rows_are_independent_of_the_batch(backends, kernels):
    """Each token's output is the same whatever other tokens share its pass (lanes never mix), and matches the
    reference; 19 tokens span three passes, the last one partly filled."""
    fast, ref = backends
    rng = np.random.default_rng(3)
    lin = random_linear(rng, 77, 113, (45,), True, False)
    p = fast.prepare_linear(lin).paths[0]
    x = rng.standard_normal((19, 113)).astype(np.float32)

    def run(rows):
        y = np.empty((len(rows), 77), np.float32)
        kernels.binary_path_lanes(np.ascontiguousarray(rows), p.s_in, p.v_bytes, p.s_mid, p.u_bytes, p.s_out, y,
                                  False)
        return y

    whole = run(x)
    np.testing.assert_array_equal(run(x[5:7]), whole[5:7])
    np.testing.assert_array_equal(run(x[18:19]), whole[18:19])
    assert close(whole, ref.linear(lin, x.astype(np.float64)))


@pytest.mark.parametrize("hidden,tokens", [(96, 4), (77, 8), (77, 13), (250, 16)])
def test_head_for_a_batched_step_matches_reference(backends, hidden, tokens):
    fast, ref = backends
    rng = np.random.default_rng(hidden + tokens)
    table = readonly(rng.standard_normal((203, hidden)).astype(np.float16))
    x = rng.standard_normal((tokens, hidden))
    got = fast.head(fast.prepare_embedding(table, GGMLType.F16, hidden), x.astype(np.float32))
    assert close(got, ref.head(ref.prepare_embedding(table, GGMLType.F16, hidden), x))


@pytest.mark.parametrize("kernels", [nk.SERIAL, nk.PARALLEL])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (6, 0.0), (0, 2.5)])
def test_attention_batch_matches_reference_per_sequence(backends, kernels, window, softcap):
    """Several sequences' tokens (ragged: 1, 3, 1, 2 tokens at positions 0, 11, 5, 19) in one kernel call: each
    token's output and each cache's new keys/values equal the float64 reference run on that sequence alone."""
    from numba.typed import List
    from synthetic import tiny_config
    fast, ref = backends
    cfg = tiny_config("llama", n_heads=6, n_kv_heads=2, head_dim=10)
    rng = np.random.default_rng(12)
    counts, positions = np.array([1, 3, 1, 2]), np.array([0, 11, 5, 19])
    caches = [fast.kv_cache(cfg, 24) for _ in counts]
    refs = [ref.kv_cache(cfg, 24) for _ in counts]
    for c, r, p in zip(caches, refs, positions):  # earlier positions hold random keys and values
        for a, b in ((c.k, r.k), (c.v, r.v)):
            a[:, :, :p] = b[:, :, :p] = rng.standard_normal(b[:, :, :p].shape)
    t = int(counts.sum())
    q, k, v = (rng.standard_normal((t, h, 10)) for h in (6, 2, 2))
    seq = np.repeat(np.arange(4), counts)
    pos = np.concatenate([np.arange(p, p + n) for p, n in zip(positions, counts)])
    out = np.empty((t, 6, 10), np.float32)
    f32 = [a.astype(np.float32) for a in (q, k, v)]
    kernels.attention_batch(f32[0], f32[1], f32[2], seq, pos, List([c.k for c in caches]),
                            List([c.v for c in caches]), 1, window, np.float32(0.3), np.float32(softcap), out)
    ends = np.cumsum(counts)
    for b, (n, e, p) in enumerate(zip(counts, ends, positions)):
        want = ref.attention(refs[b], 1, q[e - n:e], k[e - n:e], v[e - n:e], int(p), window, 0.3, softcap)
        assert close(out[e - n:e].reshape(n, -1), want)
        assert close(caches[b].k[1, :, :p + n], refs[b].k[1, :, :p + n])
        assert close(caches[b].v[1, :, :p + n], refs[b].v[1, :, :p + n])


def prefilled(model, rng, lengths):
    """One cache per sequence, each holding random tokens of its own length, and the next token of each."""
    caches = [model.new_cache(64) for _ in lengths]
    for cache, n in zip(caches, lengths):
        model.forward(rng.integers(0, model.config.vocab, n), 0, cache)
    return caches, rng.integers(0, model.config.vocab, len(lengths))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_step_equals_one_sequence_at_a_time(backends, variant_files, backend, variant):
    """Row b of one step over sequences at positions 3, 17, 9, 30 (past the sliding windows) is the logits of
    forward(token b, position b) on that sequence alone, and the step leaves each cache as forward does. On numba with
    LUT-16 both run the fused decode step (numba_decode.py), whose tokens never mix: the caches are bit for bit the
    same (the logits not quite: the head's several-token kernel adds in another order); on LUT-8 (no AVX-512) the step
    runs op by op, its linears in the several-token kernel, so the caches agree up to float rounding."""
    be = backends[0] if backend == "numba" else backends[1]
    model = Model(open_nq(variant_files[variant]), be)
    lengths = [3, 17, 9, 30]
    caches, ids = prefilled(model, np.random.default_rng(5), lengths)
    alone, ids2 = prefilled(model, np.random.default_rng(5), lengths)
    np.testing.assert_array_equal(ids, ids2)
    got = model.step(ids, np.array(lengths), caches)
    want = np.concatenate([model.forward(ids[b:b + 1], n, alone[b]) for b, n in enumerate(lengths)])
    assert got.shape == (4, model.config.vocab)
    if backend == "numpy":
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
        for b, n in enumerate(lengths):
            assert close(caches[b].k[:, :, :n + 1], alone[b].k[:, :, :n + 1], 1e-5)
            assert close(caches[b].v[:, :, :n + 1], alone[b].v[:, :, :n + 1], 1e-5)
    else:
        assert (model._fused is not None) == be.simd
        assert close(got, want, 1e-5)
        for b, n in enumerate(lengths):
            if be.simd:
                np.testing.assert_array_equal(caches[b].k, alone[b].k)
                np.testing.assert_array_equal(caches[b].v, alone[b].v)
            else:
                assert close(caches[b].k[:, :, :n + 1], alone[b].k[:, :, :n + 1], 1e-5)
                assert close(caches[b].v[:, :, :n + 1], alone[b].v[:, :, :n + 1], 1e-5)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("variant", ["llama-2path-mid", "gemma3", "qwen2"])
def test_ragged_step_equals_one_sequence_at_a_time(backends, variant_files, backend, variant):
    """Several tokens for some sequences (prompt slices) beside one for others, in one pass: each sequence's last
    logits are forward's over its tokens alone, and its cache holds the same keys."""
    be = backends[0] if backend == "numba" else backends[1]
    model = Model(open_nq(variant_files[variant]), be)
    lengths, counts = [3, 17, 0, 30], [1, 6, 11, 2]
    caches, _ = prefilled(model, np.random.default_rng(6), [max(n, 1) for n in lengths])
    alone, _ = prefilled(model, np.random.default_rng(6), [max(n, 1) for n in lengths])
    lengths[2] = 0  # the third sequence starts from position 0: its prefill slice overwrites the one token there
    ids = np.random.default_rng(9).integers(0, model.config.vocab, sum(counts))
    got = model.step(ids, np.array(lengths), caches, counts=np.array(counts))
    starts = np.cumsum([0] + counts[:-1])
    want = np.concatenate([model.forward(ids[a:a + c], n, alone[b]) for b, (a, c, n) in
                           enumerate(zip(starts, counts, lengths))])
    if backend == "numpy":
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    else:
        assert close(got, want, 1e-5)
    for b, (c, n) in enumerate(zip(counts, lengths)):
        assert close(caches[b].k[:, :, :n + c], alone[b].k[:, :, :n + c], 1e-5)


def test_numba_step_matches_reference_over_many_steps(backends, variant_files):
    """Six sequences decoded together for 12 steps, numba against the float64 reference run the same way."""
    fast, ref = backends
    nq = open_nq(variant_files["qwen3"])
    outs = []
    for be in (fast, ref):
        model = Model(nq, be)
        rng = np.random.default_rng(8)
        lengths = np.array([1, 4, 7, 2, 11, 5])
        caches, ids = prefilled(model, rng, lengths)
        steps = []
        for i in range(12):
            steps.append(model.step(ids, lengths + i, caches))
            ids = (ids * 7 + i) % nq.config.vocab  # the same token sequence on both backends
        outs.append(np.stack(steps))
    assert close(outs[0], outs[1])


def test_step_rejects_bad_batches(backends, variant_files):
    model = Model(open_nq(variant_files["llama"]), backends[0])
    caches = [model.new_cache(8), model.new_cache(8)]
    with pytest.raises(NQRunError, match="one position, cache and count"):
        model.step(np.array([1, 2]), np.array([0]), caches)
    with pytest.raises(NQRunError, match="one position, cache and count"):
        model.step(np.array([1, 2, 3]), np.array([0, 0]), caches, counts=[1, 1])
    with pytest.raises(NQRunError, match="one position, cache and count"):
        model.step(np.array([1, 2]), np.array([0, 0]), caches, counts=[2, 0])
    with pytest.raises(NQRunError, match="outside the context of 8"):
        model.step(np.array([1, 2, 3]), np.array([0, 7]), caches, counts=[1, 2])
    with pytest.raises(NQRunError, match="outside the context of 8"):
        model.step(np.array([1, 2]), np.array([0, 8]), caches)
    with pytest.raises(NQRunError, match="vocabulary"):
        model.step(np.array([1, model.config.vocab]), np.array([0, 1]), caches)


@pytest.mark.parametrize("variant", ["llama-2path-mid", "gemma3", "qwen2-q4"])
def test_split_step_equals_the_single_pass(backends, variant_files, variant, monkeypatch):
    """On 2 threads a small batch splits its sequences over both (each thread's blocks on its own core); every row
    and every cache equals what one pass over all sequences computes, bit for bit, ragged counts included."""
    fast = backends[0]
    model = Model(open_nq(variant_files[variant]), fast)
    lengths, counts = [3, 17, 5, 30, 9, 1, 12, 4], np.array([1, 2, 1, 1, 3, 1, 1, 2])
    assert fast.step_threads(int(counts.sum()), len(lengths)) == 2
    assert fast.step_threads(4, 4) == fast.step_threads(7, 7) == 1  # a thread's share is at least 4 sequences
    ids = np.random.default_rng(4).integers(0, model.config.vocab, counts.sum())
    outs = []
    for threads in (2, 1):
        monkeypatch.setattr(fast, "step_threads", lambda tokens, sequences, n=threads: n)
        caches, _ = prefilled(model, np.random.default_rng(7), lengths)
        outs.append((model.step(ids, np.array(lengths), caches, counts=counts), caches))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    for split, whole in zip(outs[0][1], outs[1][1]):
        np.testing.assert_array_equal(split.k, whole.k)
        np.testing.assert_array_equal(split.v, whole.v)


def test_split_cuts_sequences_into_runs_of_about_equal_tokens():
    from runtime.model import _split
    assert _split(np.ones(8, np.int64), 2) == [(0, 4), (4, 8)]
    assert _split(np.ones(3, np.int64), 2) == [(0, 2), (2, 3)]
    assert _split(np.ones(1, np.int64), 2) == [(0, 1)]
    assert _split(np.array([1, 1]), 4) == [(0, 1), (1, 2)]
    assert _split(np.array([64, 1, 1, 1]), 2) == [(0, 1), (1, 4)]
    assert _split(np.ones(7, np.int64), 1) == [(0, 7)]
