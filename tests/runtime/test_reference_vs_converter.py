"""The numpy reference backend against the converter's quantized torch model (converter.torch_model.load_nq) on the same
file: the two sides of the format agree on what a `.nq` file means (issue bar: 1e-3 relative)."""
import numpy as np
import pytest
import torch

from converter import torch_model as converter_model
from nqfmt import open_nq
from runtime.backends import get_backend
from runtime.model import Model
from synthetic_variants import VARIANTS


@pytest.mark.parametrize("variant", VARIANTS)
def test_numpy_reference_matches_converter_torch_model(variant_files, variant):
    path = variant_files[variant]
    nq = open_nq(path)
    ids = np.random.default_rng(9).integers(0, nq.config.vocab, size=33)
    model = Model(nq, get_backend("numpy"))
    ours = model.forward(ids, 0, model.new_cache(), all_logits=True)
    with torch.no_grad():
        theirs = converter_model.load_nq(path)(torch.from_numpy(ids)[None]).numpy().reshape(ours.shape)
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
