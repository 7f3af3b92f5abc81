"""The converter's reading of a `.nq` file (`load_nq`, torch) and the standalone runtime's (numpy reference backend)
must give the same logits on every architecture variant: two independent implementations of one format."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))
from synthetic_variants import VARIANTS, write_variant  # noqa: E402

import runtime  # noqa: E402
from converter.model import load_nq  # noqa: E402

IDS = [5, 17, 3, 44, 81, 2, 9, 60, 33, 12, 70, 1, 8]  # longer than the sliding windows of the variants


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_nq_and_runtime_agree(variant, tmp_path):
    path = write_variant(tmp_path / f"{variant}.nq", variant)
    with torch.no_grad():
        want = load_nq(path)(torch.tensor([IDS]))[0].numpy().astype(np.float64)
    got = runtime.load(path, backend="numpy").logits(IDS)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
