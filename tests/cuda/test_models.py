"""The cuda backend on whole tiny models of every architecture variant: Model.forward's logits (prefill, then
single-token steps) and the graph decoder's against the float64 numpy reference; greedy tokens identical to the
numba backend's. On the emulating device everywhere, on the GPU where there is one."""
from __future__ import annotations

import numpy as np
import pytest

from nqfmt import open_nq
from runtime.backends import get_backend
from runtime.backends.cuda import GraphDecoder
from runtime.model import Model
from runtime.sampling import Sampler, SamplingParams
from synthetic_variants import VARIANTS

REL = 1e-4  # the numba backend's bar against the reference


def close(got, want):
    return np.all(np.isfinite(got)) and np.abs(got - want).max() <= REL * np.abs(want).max()


@pytest.fixture(scope="module")
def references():
    return get_backend("numpy"), get_backend("numba", threads=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_and_graph_decoder_match_the_reference(backend, references, variant_files, variant):
    nq = open_nq(variant_files[variant])
    ids = np.random.default_rng(11).integers(0, nq.config.vocab, size=24)
    ref = Model(nq, references[0])
    want = ref.forward(ids, 0, ref.new_cache(), all_logits=True)
    model = Model(nq, backend)
    cache = model.new_cache(40)
    got = np.concatenate([model.forward(ids[:17], 0, cache, all_logits=True)]
                         + [model.forward(ids[i:i + 1], i, cache) for i in range(17, 20)])
    assert close(got, want[:20])
    decoder = GraphDecoder(model, cache)  # continues the same cache: positions 20.. run as the graph
    steps = np.concatenate([decoder.step_logits(int(ids[i]), i) for i in range(20, 24)])
    assert close(steps, want[20:])


@pytest.mark.parametrize("variant", ["llama-2path-mid", "gemma3-softcap-linear", "llama3-rope-q8", "qwen2-iq4-hot"])
def test_greedy_tokens_match_numba(backend, references, variant_files, variant):
    nq = open_nq(variant_files[variant])
    prompt = np.random.default_rng(3).integers(0, nq.config.vocab, size=9)

    def numba_tokens(n):
        model = Model(nq, references[1])
        cache = model.new_cache(32)
        logits, out = model.forward(prompt, 0, cache), []
        for pos in range(len(prompt), len(prompt) + n):
            out.append(int(np.argmax(logits[-1])))
            logits = model.forward(np.array([out[-1]]), pos, cache)
        return out

    model = Model(nq, backend)
    cache = model.new_cache(32)
    got = [int(np.argmax(model.forward(prompt, 0, cache)[-1]))]
    decoder = GraphDecoder(model, cache)
    for pos in range(len(prompt), len(prompt) + 11):
        got.append(decoder.greedy(got[-1], pos))
    assert got == numba_tokens(12)


def test_sampled_tokens_match_the_sampler(backend, variant_files):
    """Device top-k candidates + the host draw = the Sampler on the reference's full logits, repetition penalty
    included (the context's tokens are marked seen on the device)."""
    nq = open_nq(variant_files["qwen2"])
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3, seed=5)
    prompt = [int(t) for t in np.random.default_rng(4).integers(0, nq.config.vocab, size=7)]
    ref = Model(nq, get_backend("numpy"))
    ref_cache, sampler = ref.new_cache(32), Sampler(params)
    context, logits = list(prompt), ref.forward(np.array(prompt), 0, ref_cache)
    want = []
    for _ in range(8):
        want.append(sampler(logits[-1], context))
        context.append(want[-1])
        logits = ref.forward(np.array([want[-1]]), len(context) - 1, ref_cache)

    model = Model(nq, backend)
    cache = model.new_cache(32)
    logits = model.forward(np.array(prompt), 0, cache)
    sampler = Sampler(params)
    got = [sampler(logits[-1], list(prompt))]
    decoder = GraphDecoder(model, cache)
    decoder.start_sampling(prompt, params.repetition_penalty)
    for pos in range(len(prompt), len(prompt) + 7):
        got.append(decoder.sample(got[-1], pos, sampler))
    assert got == want
