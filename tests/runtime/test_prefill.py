"""Prefill on the numba backend (many tokens in one forward pass): the several-token binary linear (LUT-16 per token
with AVX-512, LUT-8 lanes elsewhere), attention over many queries and the head over many tokens as BLAS products
(gemm_attention.py, gemm_head.py) and the vectorized GLU, each against float64 numpy; whole-model prefill logits of
every variant against the reference."""
import numpy as np
import pytest
from synthetic import tiny_config
from synthetic_variants import VARIANTS

from nqfmt import BinaryPath, FactoredLinear, open_nq, pack_signs
from runtime.backends import KVCache, gemm_attention, gemm_head, get_backend, numba_kernels, numba_lut16
from runtime.backends.blas_workers import BlasWorkers
from runtime.backends.numba_cpu import NumbaBackend
from runtime.model import Model

REL = 1e-4
STAGES = [False] + ([True] if numba_lut16.available() else [])


def random_linear(rng, m, n, ranks, mid, bias):
    paths = tuple(BinaryPath(pack_signs(rng.choice([-1.0, 1.0], (r, n))), pack_signs(rng.choice([-1.0, 1.0], (m, r))),
                             rng.uniform(0.5, 1.5, n).astype(np.float16), rng.uniform(-1.5, 1.5, m).astype(np.float16),
                             rng.uniform(0.5, 1.5, r).astype(np.float16) if mid else None, r) for r in ranks)
    return FactoredLinear(m, n, paths, rng.standard_normal(m).astype(np.float32) if bias else None)


@pytest.mark.parametrize("simd", STAGES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [2, 17, 300])
@pytest.mark.parametrize("m,n,ranks,mid,bias", [(91, 100, (37,), False, False), (45, 203, (61, 19), True, True),
                                                (130, 77, (40, 33), False, True), (17, 8, (5,), True, False)])
def test_several_token_linear_matches_float64(simd, threads, tokens, m, n, ranks, mid, bias):
    rng = np.random.default_rng(tokens + m + n)
    linear = random_linear(rng, m, n, ranks, mid, bias)
    x = rng.standard_normal((tokens, n))
    want = get_backend("numpy").linear(linear, x)
    backend = NumbaBackend(threads=threads, exact=True, simd=simd)
    got = backend.linear(backend.prepare_linear(linear), x.astype(np.float32))
    assert got.shape == (tokens, m) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def reference_attention(q, k, v, pos0, window, scale, softcap, kv_heads, ctx):
    """float64 numpy attention of q at positions pos0.. over a cache whose first pos0 positions hold `k`/`v`'s
    first rows (the same keys the numba side sees)."""
    config = tiny_config(n_layers=1, n_heads=q.shape[1], n_kv_heads=kv_heads, head_dim=q.shape[2],
                         hidden=q.shape[1] * q.shape[2], context_length=ctx)
    cache = KVCache(config, ctx, np.float64)
    ref = get_backend("numpy")
    if pos0:
        ref.attention(cache, 0, q[:pos0] * 0, k[:pos0], v[:pos0], 0, window, scale, softcap)
    return ref.attention(cache, 0, q[pos0:], k[pos0:], v[pos0:], pos0, window, scale, softcap)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("t,pos0,window,softcap,heads,kv", [(70, 0, 0, 0.0, 6, 2), (131, 9, 0, 0.0, 3, 1),
                                                             (100, 30, 37, 0.0, 4, 2), (67, 3, 0, 5.0, 6, 3),
                                                             (9, 250, 0, 0.0, 3, 3), (129, 0, 65, 2.0, 2, 1)])
def test_gemm_attention_matches_float64(threads, t, pos0, window, softcap, heads, kv):
    """Every query block, the first and last partial ones included, with the causal mask, a sliding window that
    cuts inside and across blocks, soft-caps and GQA groups of 1-3 heads; the output buffer starts as NaN."""
    rng = np.random.default_rng(t + pos0 + heads)
    d, ctx = 24, pos0 + t + 5
    q = rng.standard_normal((pos0 + t, heads, d))
    k, v = rng.standard_normal((pos0 + t, kv, d)), rng.standard_normal((pos0 + t, kv, d))
    scale = 0.3
    want = reference_attention(q, k, v, pos0, window, scale, softcap, kv, ctx).reshape(t, heads, d)
    keys = np.zeros((kv, ctx, d), np.float32)
    values = np.zeros((kv, ctx, d), np.float32)
    keys[:, :pos0 + t] = k.transpose(1, 0, 2)
    values[:, :pos0 + t] = v.transpose(1, 0, 2)
    out = np.full((t, heads, d), np.nan, np.float32)
    gemm_attention.attention(BlasWorkers(threads), q[pos0:].astype(np.float32), keys, values, pos0, window, scale,
                             softcap, out)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()


def test_gemm_attention_is_used_where_it_pays():
    assert gemm_attention.worth_it(512, 0, 0) and gemm_attention.worth_it(8, 500, 0)
    assert not gemm_attention.worth_it(1, 4000, 0) and not gemm_attention.worth_it(7, 4000, 0)
    assert not gemm_attention.worth_it(100, 30, 7)  # a short window: few pairs however long the prompt


@pytest.mark.parametrize("gelu", [False, True])
def test_glu_matches_float64(gelu):
    rng = np.random.default_rng(5)
    gate = rng.standard_normal((37, 203)) * 6
    up = rng.standard_normal((37, 203))
    if gelu:
        want = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3))) * up
    else:
        want = gate / (1 + np.exp(-gate)) * up
    out = np.full(gate.shape, np.nan, np.float32)
    numba_kernels.glu(gate.astype(np.float32), up.astype(np.float32), gelu, out)
    assert np.abs(out - want).max() <= 1e-6 * np.abs(want).max()


@pytest.mark.parametrize("simd", STAGES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_logits_match_reference(variant_files, variant, threads, simd):
    """Every token's logits of a 100-token prompt, then of a 27-token continuation (attention over many queries from
    position 0 and from inside the cache), against the float64 reference."""
    nq = open_nq(variant_files[variant])
    ids = np.random.default_rng(31).integers(0, nq.config.vocab, size=127)
    logits = {}
    for name, backend in (("numpy", get_backend("numpy")), ("numba", NumbaBackend(threads=threads, exact=True, simd=simd))):
        model = Model(nq, backend)
        cache = model.new_cache()
        logits[name] = np.concatenate([model.forward(ids[:100], 0, cache, all_logits=True),
                                       model.forward(ids[100:], 100, cache, all_logits=True)])
    want = logits["numpy"]
    assert np.abs(logits["numba"] - want).max() <= REL * np.abs(want).max()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_head_over_many_tokens_matches_reference(variant_files, variant, threads, monkeypatch):
    """The head through widened row chunks and sgemm (gemm_head.py), for every table kind of the variants, in chunks
    of 40 rows (the last one partial) shared among the threads; a binary-factored head stays a factored linear."""
    monkeypatch.setattr(gemm_head, "MIN_TOKENS", 1)
    monkeypatch.setattr(gemm_head, "HEAD_ROWS", 40)
    nq = open_nq(variant_files[variant])
    x = np.random.default_rng(37).standard_normal((37, nq.config.hidden))
    want = Model(nq, get_backend("numpy")).head_table
    want = get_backend("numpy").head(want, x)
    backend = NumbaBackend(threads=threads, exact=True)
    got = backend.head(Model(nq, backend).head_table, x.astype(np.float32))
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
