"""The numba backend against the float64 numpy reference: each kernel on odd shapes (not multiples of 8 or 32),
then whole models of every architecture variant, prefill and decode."""
import numpy as np
import pytest
from nqfmt.keys import GGMLType
from gguf.quants import quantize

from nqfmt import BinaryPath, FactoredLinear, open_nq, pack_signs
from runtime.backends import get_backend
from runtime.model import Model
from synthetic_variants import VARIANTS

REL = 1e-4  # the bar: numba logits within 1e-4 (relative to the largest) of the numpy reference


@pytest.fixture(scope="module")
def backends():
    return get_backend("numba", threads=2, exact=True), get_backend("numpy")


def readonly(a):
    """Views of a memory-mapped file are read-only: test with the same array types, so the same compiled kernels."""
    a.setflags(write=False)
    return a


def random_linear(rng, m, n, ranks, mid, bias):
    paths = []
    for r in ranks:
        paths.append(BinaryPath(readonly(pack_signs(rng.standard_normal((r, n)))),
                                readonly(pack_signs(rng.standard_normal((m, r)))),
                                rng.uniform(0.5, 1.5, n).astype(np.float16),
                                rng.uniform(-1.5, 1.5, m).astype(np.float16),
                                rng.uniform(0.5, 1.5, r).astype(np.float16) if mid else None, r))
    return FactoredLinear(m, n, tuple(paths), rng.standard_normal(m).astype(np.float32) if bias else None)


def close(fast, ref, rel=REL):
    return np.abs(fast - ref).max() <= rel * np.abs(ref).max()


@pytest.mark.parametrize("m,n,ranks,mid,bias", [(91, 100, (37,), False, False), (45, 203, (61, 7), True, True),
                                                (33, 8, (8,), True, False)])
@pytest.mark.parametrize("tokens", [1, 3, 21])
def test_binary_linear(backends, m, n, ranks, mid, bias, tokens):
    fast, ref = backends
    rng = np.random.default_rng(m * n + tokens)
    lin = random_linear(rng, m, n, ranks, mid, bias)
    x = rng.standard_normal((tokens, n))
    assert close(fast.linear(fast.prepare_linear(lin), x.astype(np.float32)), ref.linear(lin, x))


@pytest.mark.parametrize("gtype", [GGMLType.F16, GGMLType.F32, GGMLType.Q8_0])
def test_embedding_and_head(backends, gtype):
    fast, ref = backends
    rng = np.random.default_rng(5)
    vocab, hidden = 203, 96
    values = rng.standard_normal((vocab, hidden)).astype(np.float32)
    table = quantize(values, GGMLType.Q8_0) if gtype == GGMLType.Q8_0 else values.astype(np.float16 if gtype == GGMLType.F16 else
                                                                            np.float32)
    table = readonly(table)
    tf, tr = fast.prepare_embedding(table, gtype, hidden), ref.prepare_embedding(table, gtype, hidden)
    ids = rng.integers(0, vocab, 11)
    np.testing.assert_array_equal(fast.embed(tf, ids), tr.rows(ids).astype(np.float32))
    x = rng.standard_normal((4, hidden))
    assert close(fast.head(tf, x.astype(np.float32)), ref.head(tr, x))


def test_f16_widening_is_exact_for_every_finite_half():
    from runtime.backends import numba_kernels as nk
    bits = np.arange(65536, dtype=np.uint16)
    finite = bits[np.isfinite(bits.view(np.float16))]
    out = np.empty((1, len(finite)), np.float32)
    nk.embed_f16(finite.reshape(1, -1), np.zeros(1, np.int64), out)
    np.testing.assert_array_equal(out[0], finite.view(np.float16).astype(np.float32))


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 3.0)])
def test_attention_over_cache(backends, window, softcap):
    fast, ref = backends
    from synthetic import tiny_config
    cfg = tiny_config("llama", n_heads=6, n_kv_heads=2, head_dim=10)
    rng = np.random.default_rng(7)
    caches = fast.kv_cache(cfg, 40), ref.kv_cache(cfg, 40)
    for pos0, t in ((0, 13), (13, 1), (14, 4)):
        q, k, v = (rng.standard_normal((t, h, 10)) for h in (6, 2, 2))
        got = fast.attention(caches[0], 1, *(a.astype(np.float32) for a in (q, k, v)), pos0, window, 0.3, softcap)
        want = ref.attention(caches[1], 1, q, k, v, pos0, window, 0.3, softcap)
        assert close(got, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_logits_match_reference(backends, variant_files, variant):
    fast, ref = backends
    nq = open_nq(variant_files[variant])
    ids = np.random.default_rng(11).integers(0, nq.config.vocab, size=29)
    want = (m := Model(nq, ref)).forward(ids, 0, m.new_cache(), all_logits=True)
    model = Model(nq, fast)
    cache = model.new_cache()
    got = np.concatenate([model.forward(ids[:19], 0, cache, all_logits=True)]
                         + [model.forward(ids[i:i + 1], i, cache) for i in range(19, 29)])
    assert close(got, want)


def test_thread_counts_agree(variant_files):
    nq = open_nq(variant_files["qwen3"])
    ids = np.arange(20) % nq.config.vocab
    outs = []
    for threads in (1, 2):
        model = Model(nq, get_backend("numba", threads=threads, exact=True))
        outs.append(model.forward(ids, 0, model.new_cache(), all_logits=True))
    assert close(outs[0], outs[1], 1e-5)


def test_kernel_cache_falls_back_to_the_user_cache_dir(monkeypatch, tmp_path):
    """With the package directory read-only, kernels are cached under $NANOQUANT_CACHE/numba instead."""
    import numba

    from runtime.backends import numba_cpu
    monkeypatch.setenv("NUMBA_CACHE_DIR", "")  # recorded, so teardown restores whatever was there before
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("NANOQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(numba_cpu.os, "access", lambda path, mode: False)
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba.config.CACHE_DIR)
    numba_cpu._configure_numba()
    assert numba.config.CACHE_DIR == str(tmp_path / "numba")
    assert numba_cpu.os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "numba")


def test_malloc_thresholds_are_set_unless_the_user_set_malloc(monkeypatch):
    """On Linux the backend fixes glibc's mmap and trim thresholds (a prefill's arrays then reuse the heap); a MALLOC_*
    or GLIBC_TUNABLES variable in the environment leaves malloc as the user configured it."""
    from runtime.backends import numba_cpu
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(numba_cpu.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(numba_cpu.sys, "platform", "linux")
    for key in [k for k in numba_cpu.os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(key)
    numba_cpu._configure_malloc()
    assert calls == [(-3, 32 << 20), (-1, 64 << 20)]
    calls.clear()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    numba_cpu._configure_malloc()
    assert calls == []


def test_kernels_are_cached_on_disk():
    from runtime.backends import numba_kernels as nk
    for kernel in (nk.rms_norm, nk.SERIAL.binary_path_decode, nk.PARALLEL.head_f16, nk.SERIAL.binary_path_lanes):
        assert kernel._cache.__class__.__name__ == "FunctionCache"
