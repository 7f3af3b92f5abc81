"""The numba backend's fused decode step (numba_decode.py: every block of a decoding step in one compiled call) against
the float64 numpy reference, for every architecture variant, one worker and two; and a step of several sequences
against each sequence alone; prompts through the fused blocks against the op-by-op prefill. The fused step runs on
LUT-16 (AVX-512) with every product in float32 (exact=True), or on the fixed-point kernels (AVX2, the default
there): those round each stage's input to 11 bits, so against the float64 reference they are held to the tolerance
their rounding allows, and against the op-by-op fixed-point kernels (the same rounding) to float32's."""
import numpy as np
import pytest

from nqfmt import open_nq
from runtime.backends import get_backend, numba_decode as nd, numba_lut16
from runtime.backends.numba_cpu import NumbaBackend
from runtime.backends.numba_int8 import isa
from runtime.model import Model
from synthetic_variants import VARIANTS

REL = 1e-4
FUSED = pytest.mark.skipif(nd.STAGES == "lut16" and not numba_lut16.available() or isa() is None,
                           reason="the fused step runs on LUT-16 (AVX-512 F) or the fixed-point kernels (AVX2)")
EXACT = nd.STAGES == "lut16"  # the fused step on LUT-16 runs with exact=True; the fixed-point one is not exact
REL_REFERENCE = REL if EXACT else 1e-2  # the fixed-point kernels' 11-bit rounding, through a random model's blocks
# fused against op by op, the same kernels: float32 summation order, which on the fixed-point kernels can move an
# input across a rounding boundary (by 1/1023 of its block's largest)
REL_OP_BY_OP = 1e-5 if EXACT else 2e-3


def fused_backend(threads: int) -> NumbaBackend:
    """A backend whose decoding steps run fused."""
    return NumbaBackend(threads=threads, exact=EXACT)


def decode_logits(nq, backend, ids, prompt):
    """Logits of a prompt's last token, then of each further token decoded one at a time."""
    model = Model(nq, backend)
    cache = model.new_cache()
    out = [model.forward(ids[:prompt], 0, cache)]
    out += [model.forward(ids[i:i + 1], i, cache) for i in range(prompt, len(ids))]
    return model, np.concatenate(out)


@FUSED
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_decode_matches_reference(variant_files, variant, threads):
    nq = open_nq(variant_files[variant])
    ids = np.random.default_rng(23).integers(0, nq.config.vocab, size=27)
    _, want = decode_logits(nq, get_backend("numpy"), ids, 9)
    model, got = decode_logits(nq, fused_backend(threads), ids, 9)
    assert model._fused is not None and model._fused.workers == threads
    assert np.abs(got - want).max() <= REL_REFERENCE * np.abs(want).max()


@FUSED
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", ["llama-2path-mid", "mistral-sliding", "gemma3", "qwen3", "llama-head64"])
def test_fused_step_of_several_sequences_equals_each_alone(variant_files, variant, threads):
    """One fused call over 5 sequences (each its own cache, at positions 2, 13, 0, 9, 21: past the sliding window)
    gives every sequence the hidden state and cache entries it gets alone, bit for bit."""
    model = Model(open_nq(variant_files[variant]), fused_backend(threads))
    rng = np.random.default_rng(31)
    positions = np.array([2, 13, 0, 9, 21])
    caches = [model.new_cache(32) for _ in positions]
    for c, p in zip(caches, positions):  # earlier positions hold random keys and values
        c.k[:, :, :p] = rng.standard_normal(c.k[:, :, :p].shape)
        c.v[:, :, :p] = rng.standard_normal(c.v[:, :, :p].shape)
    alone = [model.new_cache(32) for _ in positions]
    for a, c in zip(alone, caches):
        a.k[:], a.v[:] = c.k, c.v
    x = rng.standard_normal((5, model.config.hidden)).astype(np.float32)
    together = model._fused(x, positions, caches)
    for t, p in enumerate(positions):
        np.testing.assert_array_equal(model._fused(x[t:t + 1], positions[t:t + 1], [alone[t]])[0], together[t])
        np.testing.assert_array_equal(alone[t].k, caches[t].k)
        np.testing.assert_array_equal(alone[t].v, caches[t].v)


@FUSED
@pytest.mark.parametrize("workers", [2, 3, 5])
def test_any_number_of_workers_gives_the_same_bits(variant_files, workers):
    """Every chunk is computed the same way whichever worker takes it, so a step's outputs and cache entries do not
    depend on the number of workers: more workers than threads (a worker runs after another has finished, its range
    taken by the others), ranges of unequal length, some empty (3 sequences' kv heads over 5 workers)."""
    model = Model(open_nq(variant_files["llama-2path-mid"]), fused_backend(1))
    many = nd.FusedBlocks(model, workers)
    rng = np.random.default_rng(37)
    positions = np.array([4, 0, 11])
    caches = {n: [model.new_cache(16) for _ in positions] for n in ("one", "many")}
    for i, p in enumerate(positions):
        keys, values = rng.standard_normal(caches["one"][i].k.shape), rng.standard_normal(caches["one"][i].v.shape)
        for n in caches:
            caches[n][i].k[:], caches[n][i].v[:] = keys, values
    x = rng.standard_normal((len(positions), model.config.hidden)).astype(np.float32)
    for step in range(3):
        one, out = model._fused(x, positions + step, caches["one"]), many(x, positions + step, caches["many"])
        np.testing.assert_array_equal(out, one)
        x = np.tanh(one)
    for a, b in zip(caches["one"], caches["many"]):
        np.testing.assert_array_equal(a.k, b.k)
        np.testing.assert_array_equal(a.v, b.v)


@FUSED
def test_one_compiled_walk_serves_every_worker_count(variant_files):
    """A one-worker step and the threaded caller pass the worker number as one type, so the walk compiles once
    (numba compiles a callee again for each argument type, and the walk takes about a minute to compile)."""
    nq = open_nq(variant_files["llama"])
    for threads in (1, 2):
        model = Model(nq, fused_backend(threads))
        model.forward(np.array([3]), 0, model.new_cache())
        assert model._fused.workers == threads
    assert len(nd._blocks.signatures) == 1


@FUSED
def test_fused_decode_past_a_sliding_window_equals_op_by_op(variant_files):
    """Past the window (7 on this variant) the fused attention reads only the last positions, as the op-by-op
    kernels do; both run the same float32 arithmetic up to summation order."""
    nq = open_nq(variant_files["mistral-sliding"])
    ids = np.random.default_rng(29).integers(0, nq.config.vocab, size=40)
    _, fused = decode_logits(nq, fused_backend(2), ids, 3)
    model, plain = decode_logits(nq, _op_by_op(2), ids, 3)
    assert model._fused is None
    assert np.abs(fused - plain).max() <= REL_OP_BY_OP * np.abs(plain).max()


def _op_by_op(threads: int) -> NumbaBackend:
    """The fused backend's kernels, op by op."""
    backend = fused_backend(threads)
    backend.fused_blocks = lambda model: None
    return backend


@FUSED
@pytest.mark.parametrize("variant", ["llama-2path-mid", "mistral-sliding", "gemma3", "qwen3", "llama-head64"])
def test_fused_prompt_equals_op_by_op_prefill(variant_files, variant):
    """With threads, a prompt of up to max_tokens runs through the fused blocks, its tokens sharing one cache and
    attending causally to each other (past the sliding window of 7 on mistral-sliding), here a prompt of 12 tokens
    and then 9 more after it: every token's logits and the cache's keys and values equal the op-by-op prefill's up
    to float rounding."""
    nq = open_nq(variant_files[variant])
    ids = np.random.default_rng(41).integers(0, nq.config.vocab, size=21)
    results = {}
    for name, backend in (("fused", fused_backend(2)), ("plain", _op_by_op(2))):
        model = Model(nq, backend)
        cache = model.new_cache(32)
        logits = [model.forward(ids[:12], 0, cache, all_logits=True), model.forward(ids[12:], 12, cache,
                                                                                    all_logits=True)]
        results[name] = np.concatenate(logits), cache.k[:, :, :21].copy(), cache.v[:, :, :21].copy()
        assert (model._fused is not None and model._fused.max_tokens >= 12) == (name == "fused")
    for got, want in zip(results["fused"], results["plain"]):
        assert np.abs(got - want).max() <= REL_OP_BY_OP * np.abs(want).max()


@FUSED
@pytest.mark.parametrize("max_tokens", [nd.PROMPT_TOKENS, 6, 4])
def test_step_of_prompts_and_next_tokens_is_each_sequence_alone(variant_files, monkeypatch, max_tokens):
    """A batched step mixing a new prompt, a decoding token and a continuation (7, 1 and 4 tokens): in one fused call
    where each fits max_tokens, else the longer prompts op by op on their own (max_tokens 6: the 7; 4: the 7, while
    the others, 5 tokens together, stay fused); each sequence's logits and cache are bit for bit those of forward()
    on its own tokens."""
    nq = open_nq(variant_files["mistral-sliding"])
    model = Model(nq, fused_backend(2))
    monkeypatch.setattr(model._fused, "max_tokens", max_tokens)
    rng = np.random.default_rng(43)
    counts, positions = np.array([7, 1, 4]), np.array([0, 9, 3])
    ids = rng.integers(0, nq.config.vocab, size=int(counts.sum()))
    history = rng.integers(0, nq.config.vocab, size=9)
    caches, alone = [model.new_cache(24) for _ in counts], [model.new_cache(24) for _ in counts]
    for c in (caches, alone):
        model.forward(history, 0, c[1])
        model.forward(history[:3], 0, c[2])
    together = model.step(ids, positions, caches, counts)
    ends = np.cumsum(counts)
    for b in range(len(counts)):
        want = model.forward(ids[ends[b] - counts[b]:ends[b]], positions[b], alone[b])
        np.testing.assert_array_equal(together[b], want[0])
        np.testing.assert_array_equal(caches[b].k, alone[b].k)
        np.testing.assert_array_equal(caches[b].v, alone[b].v)


def test_lut8_steps_run_op_by_op(variant_files):
    """LUT-8 (exact=True on CPUs without AVX-512) has no fused step: decoding and batched steps run op by op, and
    agree with the float64 reference."""
    nq = open_nq(variant_files["llama-2path-mid"])
    ids = np.random.default_rng(47).integers(0, nq.config.vocab, size=14)
    _, want = decode_logits(nq, get_backend("numpy"), ids, 5)
    for threads in (1, 2):
        model, got = decode_logits(nq, NumbaBackend(threads=threads, exact=True, simd=False), ids, 5)
        assert model._fused is None
        assert np.abs(got - want).max() <= REL * np.abs(want).max()


@FUSED
def test_prompts_beyond_max_tokens_and_one_thread_run_op_by_op(variant_files, monkeypatch):
    """One worker gains nothing from a fused prompt (its op-by-op prefill is faster), and a prompt longer than
    max_tokens runs op by op on any number; in a batched step such a prompt runs op by op on its own while the other
    sequences (however many tokens they add up to) stay in one fused call, as each would run alone."""
    nq = open_nq(variant_files["llama-2path-mid"])
    assert Model(nq, fused_backend(1))._fused.max_tokens == 1
    model = Model(nq, fused_backend(2))
    assert model._fused.max_tokens == nd.PROMPT_TOKENS
    monkeypatch.setattr(model._fused, "max_tokens", 5)  # the synthetic model's context is shorter than the default
    calls = []
    monkeypatch.setattr(model, "_decoder", lambda ids, positions, attend: calls.append(len(ids)) or
                        np.zeros((len(ids), model.config.hidden), np.float32))
    model.forward(np.arange(6), 0, model.new_cache(8))
    model.forward(np.arange(5), 0, model.new_cache(8))
    model.step(np.arange(6), np.array([0, 0]), [model.new_cache(8), model.new_cache(8)], np.array([3, 3]))
    model.step(np.arange(8), np.array([0, 0, 0]), [model.new_cache(8) for _ in range(3)], np.array([1, 6, 1]))
    assert calls == [6, 6]


@pytest.mark.skipif(not numba_lut16.available(), reason="LUT-16 kernels need AVX-512 F")
@pytest.mark.parametrize("m,n,r", [(91, 100, 37), (45, 203, 61), (17, 8, 5)])
def test_lut16_path_matches_float64(m, n, r):
    from nqfmt import pack_signs
    rng = np.random.default_rng(m + n + r)
    v, u = rng.choice([-1.0, 1.0], (r, n)), rng.choice([-1.0, 1.0], (m, r))
    s_in, s_mid, s_out = rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 1.5, r), rng.uniform(-1.5, 1.5, m)
    x = rng.standard_normal(n)
    want = s_out * (u @ (s_mid * (v @ (s_in * x))))
    v_tiles, u_tiles = numba_lut16.repack(pack_signs(v)), numba_lut16.repack(pack_signs(u))
    sizes = numba_lut16.scratch_sizes(v_tiles.shape[1], u_tiles.shape[1], v_tiles.shape[0], u_tiles.shape[0])
    xs, tab, h, sums = (np.full(s, np.nan, np.float32) for s in sizes)  # NaN scratch: every read must be written
    y = np.full(m, 2.0, np.float32)
    f32 = [a.astype(np.float32) for a in (x, s_in, s_mid, s_out)]
    numba_lut16.binary_path_token(f32[0], f32[1], v_tiles, f32[2], u_tiles, f32[3], xs, tab, h, sums, y, True)
    assert np.abs(y - 2.0 - want).max() <= 1e-5 * np.abs(want).max()
