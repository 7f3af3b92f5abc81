"""The numpy reference backend against transformers' own forward on the same weights (factored linears expanded
to dense), for every architecture variant: this is what makes the reference a reference."""
import numpy as np
import pytest

from synthetic_variants import HF_VARIANTS
from hf_reference import hf_logits
from nqfmt import open_nq
from runtime.backends import get_backend
from runtime.model import Model


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_numpy_reference_matches_transformers(variant_files, variant):
    nq = open_nq(variant_files[variant])
    ids = np.random.default_rng(3).integers(0, nq.config.vocab, size=37)
    model = Model(nq, get_backend("numpy"))
    ours = model.forward(ids, 0, model.new_cache(), all_logits=True)
    theirs = hf_logits(nq, ids)
    # transformers runs RMSNorm and RoPE angles in float32 even in a float64 model: agreement is ~1e-6, not 1e-12
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    assert np.median(np.abs(ours - theirs)) <= 1e-5 * np.abs(theirs).max()


def test_incremental_decoding_matches_one_pass(variant_files):
    """Prefill in pieces plus single-token steps gives the same logits as one pass (KV cache, positions, windows)."""
    for variant in ("mistral-sliding", "gemma3", "qwen2"):
        nq = open_nq(variant_files[variant])
        model = Model(nq, get_backend("numpy"))
        ids = np.random.default_rng(4).integers(0, nq.config.vocab, size=23)
        whole = model.forward(ids, 0, model.new_cache(), all_logits=True)
        cache = model.new_cache(40)
        parts = [model.forward(ids[:9], 0, cache, all_logits=True)]
        parts += [model.forward(ids[i:i + 1], i, cache) for i in range(9, 23)]
        np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-10 * np.abs(whole).max())
