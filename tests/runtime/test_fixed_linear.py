"""The fixed-point binary linears (numba_fixed.py, AVX2 without AVX-512) against a float64 reference that rounds each
stage's input the same way: per block of 32, q = rint(v·1023/absmax) in float32, then Σ ±q·absmax/1023 in float64.
Odd shapes (not multiples of 8 or 32), several paths, one token and several, serial and parallel; a token's result
does not depend on the tokens beside it; the backend picks the kernels by default where LUT-16 does not run and keeps
LUT-8 with exact=True. On AVX-512 CPUs the tests run them with LUT-16 switched off (simd=False)."""
import numpy as np
import pytest

from nqfmt import BinaryPath, FactoredLinear, pack_signs, unpack_signs
from runtime.backends import numba_fixed as fixed
from runtime.backends.numba_cpu import NumbaBackend
from runtime.backends.numba_int8 import isa

pytestmark = pytest.mark.skipif(isa() is None, reason="the fixed-point kernels need AVX2")


def rounded(v: np.ndarray) -> np.ndarray:
    """v (float32, 1-D) as the kernels see it, in float64: per block of 32, rint(v·1023/absmax)·absmax/1023."""
    width = -(-len(v) // 32) * 32
    blocks = np.zeros(width, np.float32)
    blocks[:len(v)] = v
    blocks = blocks.reshape(-1, 32)
    amax = np.abs(blocks).max(1, keepdims=True)
    inv = np.where(amax > 0, np.float32(1023) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv)
    assert np.abs(q).max() <= 1023
    return (q.astype(np.float64) * (amax / np.float32(1023)).astype(np.float64)).reshape(-1)[:len(v)]


def reference(lin: FactoredLinear, x: np.ndarray) -> np.ndarray:
    """Each path's two stages on rounded inputs; the middle vector is float32 as the kernel keeps it."""
    y = np.zeros((x.shape[0], lin.m))
    for p in lin.paths:
        v_signs, u_signs = unpack_signs(p.v_signs, lin.n, np.float64), unpack_signs(p.u_signs, p.rank, np.float64)
        s_mid = np.ones(p.rank) if p.scale_mid is None else p.scale_mid.astype(np.float64)
        for t in range(x.shape[0]):
            h = (v_signs @ rounded(x[t] * p.scale_in.astype(np.float32))).astype(np.float32)
            y[t] += (u_signs @ rounded(h * s_mid.astype(np.float32))) * p.scale_out.astype(np.float64)
    return y


def random_linear(rng, m, n, ranks, mid):
    paths = tuple(BinaryPath(pack_signs(rng.standard_normal((r, n))), pack_signs(rng.standard_normal((m, r))),
                             rng.uniform(0.5, 1.5, n).astype(np.float16), rng.uniform(-1.5, 1.5, m).astype(np.float16),
                             rng.uniform(0.5, 1.5, r).astype(np.float16) if mid else None, r) for r in ranks)
    for p in paths:
        p.v_signs.setflags(write=False)  # as the memory-mapped file's views
        p.u_signs.setflags(write=False)
    return FactoredLinear(m, n, paths, None)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n,ranks,mid,tokens", [(91, 100, (37,), False, 1), (45, 203, (61, 7), True, 1),
                                                  (33, 8, (8,), True, 3), (300, 577, (211,), True, 5),
                                                  (1536, 576, (419,), True, 1)])
def test_fixed_linear_matches_rounded_reference(threads, m, n, ranks, mid, tokens):
    rng = np.random.default_rng(m + n + tokens)
    backend = NumbaBackend(threads=threads, simd=False)
    assert backend.fixed_linears
    lin = random_linear(rng, m, n, ranks, mid)
    x = (rng.standard_normal((tokens, n)) * rng.uniform(0.01, 3.0, n)).astype(np.float32)
    got = backend.linear(backend.prepare_linear(lin), x)
    want = reference(lin, x)
    assert got.shape == (tokens, m) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()
    exact = NumbaBackend(threads=threads, exact=True, simd=False)
    floats = exact.linear(exact.prepare_linear(lin), x)
    error = np.abs(got - floats).max() / np.abs(floats).max()
    assert 1e-6 < error < 5e-3  # the rounding really ran, and costs what 11 bits should


def test_token_result_does_not_depend_on_its_neighbours():
    rng = np.random.default_rng(7)
    lin = random_linear(rng, 130, 250, (90, 33), True)
    x = rng.standard_normal((9, 250)).astype(np.float32)
    for threads in (1, 2):
        backend = NumbaBackend(threads=threads, simd=False)
        prepared = backend.prepare_linear(lin)
        together = backend.linear(prepared, x)
        for t in range(9):
            assert np.array_equal(backend.linear(prepared, x[t:t + 1])[0], together[t])


def test_repack_puts_rows_where_the_unpacks_read_them():
    rng = np.random.default_rng(1)
    signs = rng.integers(0, 256, (45, 12), dtype=np.uint8)
    tiles = fixed.repack(signs)
    assert tiles.shape == (2, 12, 32)
    assert sorted(fixed.POSITION) == list(range(32))
    for row in range(64):
        want = signs[row] if row < 45 else np.zeros(12, np.uint8)
        assert np.array_equal(tiles[row // 32, :, fixed.POSITION[row % 32]], want)


def test_zero_input_blocks_and_exact_keeps_lut8():
    rng = np.random.default_rng(2)
    lin = random_linear(rng, 40, 96, (50,), False)
    x = rng.standard_normal((1, 96)).astype(np.float32)
    x[0, 32:64] = 0.0  # a block of zeros: scale 0, no division by zero
    backend = NumbaBackend(threads=1, simd=False)
    got = backend.linear(backend.prepare_linear(lin), x)
    assert np.isfinite(got).all()
    assert np.abs(got - reference(lin, x)).max() <= 2e-6 * np.abs(got).max()
    exact = NumbaBackend(threads=1, exact=True, simd=False)
    assert not exact.fixed_linears and exact.prepare_linear(lin).paths[0].v_tiles is None


def test_default_backend_runs_them_where_lut16_does_not():
    backend = NumbaBackend(threads=1)
    assert backend.fixed_linears == (not backend.simd)
