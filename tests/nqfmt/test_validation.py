"""Each kind of malformed file gives NQFormatError naming what is wrong."""
import mmap
import struct
import zlib

import numpy as np
import pytest
from synthetic import tiny_config, write_random

import nqfmt.writer
from nqfmt import NQFormatError, open_nq
from nqfmt import keys as K
from nqfmt.layout import TensorSpec
from nqfmt.reader import NQFile


def _layout(path):
    """data_start and (offset, nbytes) of every tensor, parsed without validation beyond the structure."""
    f = NQFile.__new__(NQFile)
    f.path, f.size = path, path.stat().st_size
    with open(path, "rb") as fh:
        f._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    f._buf = memoryview(f._mm)
    _, _, tensors, data_start = f._parse_header()
    return data_start, list(tensors.values())


def write_sealed(path, data: bytearray):
    """Write `data` with correct checksums (header CRC and every tensor CRC)."""
    path.write_bytes(bytes(data))
    data_start, tensors = _layout(path)
    table = tensors[-1]
    crcs = [zlib.crc32(bytes(data[:data_start]))] + [zlib.crc32(bytes(data[t.offset:t.offset + t.nbytes]))
                                                     for t in tensors[:-1]]
    data[table.offset:table.offset + table.nbytes] = np.array(crcs, np.uint32).tobytes()
    path.write_bytes(bytes(data))


def find_value(data: bytes, key: str) -> int:
    """Byte offset just after `key`'s type field (where its value starts)."""
    k = key.encode()
    i = data.index(struct.pack("<Q", len(k)) + k)
    return i + 8 + len(k) + 4


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.nq"
    write_random(path, tiny_config("qwen2"))
    return path


def test_bad_magic(good):
    data = bytearray(good.read_bytes())
    data[0:4] = b"GGUX"
    good.write_bytes(bytes(data))
    with pytest.raises(NQFormatError, match="bad magic"):
        open_nq(good)


def test_unknown_format_version(good):
    data = bytearray(good.read_bytes())
    at = find_value(data, K.VERSION)
    data[at:at + 4] = struct.pack("<I", 99)
    write_sealed(good, data)
    with pytest.raises(NQFormatError, match="format version 99 not supported"):
        open_nq(good)


def test_wrong_metadata_type(good):
    data = bytearray(good.read_bytes())
    at = find_value(data, K.BLOCK_COUNT)
    data[at - 4:at] = struct.pack("<I", 5)  # UINT32 -> INT32, same width
    write_sealed(good, data)
    with pytest.raises(NQFormatError, match="nanoquant.block_count"):
        open_nq(good)


def test_truncation(good):
    data = good.read_bytes()
    good.write_bytes(data[:-100])
    with pytest.raises(NQFormatError, match="truncated"):
        open_nq(good)


def test_header_corruption_is_caught_by_its_checksum(good):
    data = bytearray(good.read_bytes())
    at = find_value(data, K.ROPE_THETA)
    data[at] ^= 0x40
    good.write_bytes(bytes(data))
    with pytest.raises(NQFormatError, match="header checksum"):
        open_nq(good)


def test_data_corruption_is_caught_by_verify(good):
    data = bytearray(good.read_bytes())
    _, tensors = _layout(good)
    emb = tensors[0]
    data[emb.offset + 10] ^= 0x01
    good.write_bytes(bytes(data))
    f = open_nq(good)
    with pytest.raises(NQFormatError, match="token_embd.weight.*checksum"):
        f.verify()


def _write_with_plan(tmp_path, monkeypatch, edit):
    """Write a file whose tensor plan was edited behind the writer's back (the writer itself refuses such plans)."""
    real = nqfmt.writer.file_specs
    monkeypatch.setattr(nqfmt.writer, "file_specs", lambda *a, **k: edit(real(*a, **k)))
    path = tmp_path / "edited.nq"
    write_random(path, tiny_config())
    monkeypatch.setattr(nqfmt.writer, "file_specs", real)
    return path


def test_missing_tensor(tmp_path, monkeypatch):
    path = _write_with_plan(tmp_path, monkeypatch, lambda s: [t for t in s if t.name != "blk.1.ffn_norm.weight"]
                            [:-1] + [TensorSpec(K.CHECKSUMS, (len(s) - 1,), s[-1].gtype)])
    with pytest.raises(NQFormatError, match="'blk.1.ffn_norm.weight' is missing"):
        open_nq(path)


def test_unexpected_tensor(tmp_path, monkeypatch):
    extra = TensorSpec("blk.0.mystery.weight", (4,), K.NORM_TYPE)
    path = _write_with_plan(tmp_path, monkeypatch, lambda s: s[:-1] + [extra, TensorSpec(K.CHECKSUMS, (len(s) + 1,),
                                                                                          s[-1].gtype)])
    with pytest.raises(NQFormatError, match="unexpected tensor 'blk.0.mystery.weight'"):
        open_nq(path)


def test_shape_inconsistent_with_config(tmp_path, monkeypatch):
    edit = lambda s: [TensorSpec(t.name, (73,), t.gtype) if t.name == K.OUTPUT_NORM else t for t in s]  # noqa: E731
    path = _write_with_plan(tmp_path, monkeypatch, edit)
    with pytest.raises(NQFormatError, match=r"'output_norm.weight': F32\[73\] where the config needs F32\[72\]"):
        open_nq(path)


def test_rank_above_min_m_n(tmp_path, monkeypatch):
    def edit(specs):  # attn_k is 24x72: give path 0 rank 25
        out = []
        for t in specs:
            if t.name.startswith("blk.0.attn_k.p0."):
                part = t.name.rsplit(".", 1)[1]
                shape = {"v_signs": (25, 3), "u_signs": (24, 1)}.get(part, t.shape)
                t = TensorSpec(t.name, shape, t.gtype)
            out.append(t)
        return out
    path = tmp_path / "r.nq"
    real = nqfmt.writer.file_specs
    monkeypatch.setattr(nqfmt.writer, "file_specs", lambda *a, **k: edit(real(*a, **k)))
    w = nqfmt.writer.NQWriter(path, tiny_config(), *_meta(), _plans(tiny_config(), 24))
    rng = np.random.default_rng(0)
    for spec in w.plan:
        arr = np.ones(spec.numpy_shape, spec.numpy_dtype) if spec.gtype != K.SIGN_TYPE else \
            np.zeros(spec.numpy_shape, np.uint32)
        w.write(spec.name, arr * (1 + rng.random() if arr.dtype.kind == "f" else 1))
    w.commit()
    monkeypatch.setattr(nqfmt.writer, "file_specs", real)
    with pytest.raises(NQFormatError, match="blk.0.attn_k.p0: rank 25 outside 1..min"):
        open_nq(path)


def test_non_finite_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(nqfmt.writer, "is_scale", lambda name: False)
    path = tmp_path / "nan.nq"
    w = nqfmt.writer.NQWriter(path, tiny_config(), *_meta(), _plans(tiny_config(), 8))
    for spec in w.plan:
        arr = np.zeros(spec.numpy_shape, np.uint32) if spec.gtype == K.SIGN_TYPE else \
            np.ones(spec.numpy_shape, spec.numpy_dtype)
        if spec.name == "blk.1.ffn_up.p0.scale_out":
            arr[3] = np.nan
        w.write(spec.name, arr)
    w.commit()
    with pytest.raises(NQFormatError, match="'blk.1.ffn_up.p0.scale_out': non-finite scale"):
        open_nq(path)


def _meta():
    from synthetic import provenance

    from nqfmt import TokenizerInfo
    return TokenizerInfo("{}"), provenance()


def _plans(cfg, r):
    from nqfmt import LinearPlan
    return [{lin: LinearPlan((min(r, *cfg.linear_shape(lin)),)) for lin in K.LINEARS} for _ in range(cfg.n_layers)]


def test_not_a_file(tmp_path):
    with pytest.raises(NQFormatError, match="cannot open"):
        open_nq(tmp_path / "missing.nq")
    (tmp_path / "empty.nq").write_bytes(b"")
    with pytest.raises(NQFormatError, match="truncated"):
        open_nq(tmp_path / "empty.nq")
