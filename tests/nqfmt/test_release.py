"""NQFile.release and verify let the file's pages leave the process's resident set (MADV_DONTNEED) without changing
what a view reads; measured on the mapping's own Rss in /proc/self/smaps (Linux)."""
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import tiny_config, write_random

from nqfmt import keys as K
from nqfmt.keys import GGMLType
from nqfmt import open_nq

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def resident_kb(path: Path) -> int:
    """Resident kB of every mapping of `path` in this process."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.fixture
def big_file(tmp_path):
    path = tmp_path / "m.nq"
    write_random(path, tiny_config(hidden=576, ffn=1536, n_heads=9, n_kv_heads=3, head_dim=64, vocab=2000),
                 ranks=(288,), seed=1, embedding_type=GGMLType.IQ4_NL)
    return path


def test_verify_and_release_drop_pages_and_keep_values(big_file):
    f = open_nq(big_file)
    name = K.path_tensor(0, K.LINEARS[-1], 0, K.U_SIGNS)
    view = f.array(name)
    before = view.copy()
    f.verify()  # reads every byte, letting each chunk go after its checksum
    assert resident_kb(big_file) < 0.25 * big_file.stat().st_size / 1024
    total = int(view.sum(dtype=np.uint64))  # reads the tensor back in
    touched = resident_kb(big_file)
    assert touched >= view.nbytes / 1024 - 8
    f.release(view)
    assert resident_kb(big_file) <= touched - view.nbytes / 1024 + 8
    np.testing.assert_array_equal(view, before)  # the same bytes, faulted back in from the page cache
    assert int(view.sum(dtype=np.uint64)) == total


def test_release_ignores_arrays_that_are_not_views_of_the_file(big_file):
    f = open_nq(big_file)
    f.release(np.zeros(10, np.uint32), f.array(K.CHECKSUMS).copy())  # no error, nothing dropped


def test_a_model_on_repacked_weights_keeps_little_of_the_file_resident(big_file):
    """The numba backend on AVX-512 computes from repacked tiles: after the model is built, the file's pages of
    the signs (most of the file) are no longer resident."""
    from runtime.backends import numba_lut16
    from runtime.backends.numba_cpu import NumbaBackend
    from runtime.model import Model
    if not numba_lut16.available():
        pytest.skip("the LUT-16 kernels (AVX-512) keep the file's signs; nothing is copied to release")
    f = open_nq(big_file)
    f.verify()
    model = Model(f, NumbaBackend(threads=1, exact=True))
    assert resident_kb(big_file) < 0.25 * big_file.stat().st_size / 1024
    cache = model.new_cache(8)
    assert np.isfinite(model.forward(np.arange(5), 0, cache)).all()
