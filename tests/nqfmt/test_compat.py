"""Other GGUF tools read our files; opening is fast even with a large tokenizer."""
import json
import subprocess
import sys
import time

import numpy as np
from gguf import GGUFReader
from synthetic import tiny_config, write_random

from nqfmt import open_nq
from nqfmt import keys as K


def test_gguf_dump_reads_our_file(tmp_path):
    path = tmp_path / "m.nq"
    write_random(path, tiny_config("qwen3"))
    out = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_dump", "--json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    dump = json.loads(out)
    assert dump["metadata"][K.ARCH]["value"] == "nanoquant"
    assert K.path_tensor(1, K.FFN_DOWN, 0, K.U_SIGNS) in dump["tensors"]


def test_gguf_reader_sees_the_same_tensors(tmp_path):
    path = tmp_path / "m.nq"
    written = write_random(path, tiny_config("gemma3"), ranks=(33,))
    r = GGUFReader(path)
    for t in r.tensors:
        if t.name in written:
            got = np.asarray(t.data)
            want = written[t.name]
            np.testing.assert_array_equal(got.view(want.dtype).reshape(want.shape), want, err_msg=t.name)


def test_open_is_fast_with_a_large_tokenizer(tmp_path, monkeypatch):
    """A 150k-entry vocabulary as one JSON string: opening must stay far below a second."""
    import synthetic
    vocab = {f"tok{i}": i for i in range(150_000)}
    big = json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": [f"t o{i}" for i in range(150_000)]}})
    monkeypatch.setattr(synthetic, "TINY_TOKENIZER", big)
    path = tmp_path / "big.nq"
    synthetic.write_random(path, tiny_config())
    t0 = time.perf_counter()
    f = open_nq(path)
    elapsed = time.perf_counter() - t0
    assert len(f.tokenizer.json) > 3_000_000
    assert elapsed < 0.5, elapsed


def test_nqfmt_never_imports_torch():
    code = "import nqfmt, nqfmt.cli, nqdata, sys; print(any(m in sys.modules for m in ('torch', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_own_type_enums_equal_the_gguf_package():
    import gguf

    from nqfmt.keys import TYPE_SIZES, GGMLType, ValueType
    assert {v.name: int(v) for v in ValueType} == {v.name: int(v) for v in gguf.GGUFValueType}
    for t in GGMLType:
        assert int(gguf.GGMLQuantizationType[t.name]) == int(t)
        assert TYPE_SIZES[t] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.name]]


def test_q8_0_reference_equals_gguf_dequantizer():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from nqfmt.q8_0 import dequantize_q8_0
    x = np.random.default_rng(1).standard_normal((7, 96)).astype(np.float32)
    raw = quantize(x, GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(dequantize_q8_0(raw), dequantize(raw, GGMLQuantizationType.Q8_0))


def test_reading_never_imports_gguf():
    code = "import nqfmt, nqfmt.cli, sys; nqfmt.open_nq; print('gguf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
