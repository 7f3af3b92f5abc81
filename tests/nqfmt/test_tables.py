"""The compact embedding / head layouts of spec/FORMAT.md §3.4: 4-bit and binary-factored tables, tied and untied,
written, read back bit for bit, and every malformed variant refused."""
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from synthetic import tiny_config, write_random

import nqfmt.writer
from nqfmt import HotRows, LinearPlan, NQFormatError, TensorSpec, open_nq
from nqfmt import keys as K
from nqfmt.info import summarize
from nqfmt.q4 import GRIDS, dequantize_q4, pack_q4, quantize_iq4_nl, quantize_q4_0, unpack_q4

GGMLType = K.GGMLType


def test_q4_0_reference_quantizer_matches_gguf():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 96)) * rng.uniform(0.1, 3, (5, 1))
    np.testing.assert_array_equal(quantize_q4_0(x), quantize(x.astype(np.float32), GGMLQuantizationType.Q4_0))


SPEC_GRIDS = {GGMLType.Q4_0: np.arange(16) - 8,  # spec/FORMAT.md §3.4, written out again
              GGMLType.IQ4_NL: np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])}


@pytest.mark.parametrize("gtype,quantizer", [(GGMLType.Q4_0, quantize_q4_0), (GGMLType.IQ4_NL, quantize_iq4_nl)])
def test_4bit_helpers_match_gguf_and_the_spec(gtype, quantizer):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 96)) * rng.uniform(0.1, 3, (5, 1))
    raw = quantizer(x)
    np.testing.assert_array_equal(GRIDS[gtype], SPEC_GRIDS[gtype])
    np.testing.assert_array_equal(dequantize_q4(raw, gtype), dequantize(raw, GGMLQuantizationType(gtype)))
    d, q = unpack_q4(raw)
    np.testing.assert_array_equal(pack_q4(d, q), raw)
    want = d.astype(np.float64).repeat(32, axis=1) * SPEC_GRIDS[gtype][q]  # the spec's formula, float64
    np.testing.assert_allclose(dequantize_q4(raw, gtype), want, rtol=1e-6)
    assert np.abs(dequantize_q4(raw, gtype) - x).max() <= np.abs(x).max() / 8


def test_4bit_pack_refuses_codes_and_shapes_it_cannot_hold():
    with pytest.raises(ValueError, match="0..15"):
        pack_q4(np.ones((1, 1), np.float16), np.full((1, 32), 16))
    with pytest.raises(ValueError, match="whole blocks"):
        pack_q4(np.ones((1, 1), np.float16), np.zeros((1, 40)))


@pytest.mark.parametrize("gtype", [GGMLType.Q4_0, GGMLType.IQ4_NL])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied, untied
def test_4bit_tables_round_trip(tmp_path, arch, gtype):
    path = tmp_path / "m.nq"
    cfg = tiny_config(arch, hidden=96, n_heads=4, head_dim=24)
    written = write_random(path, cfg, embedding_type=gtype)
    f = open_nq(path)
    f.verify()
    assert f.tables[K.EMBD_TABLE] == gtype
    names = [K.TOKEN_EMBD] + ([] if cfg.tie_embeddings else [K.OUTPUT])
    for name in names:
        assert f.tensors[name].gtype == gtype and f.tensors[name].shape == (cfg.vocab, 96)
        np.testing.assert_array_equal(f.array(name), written[name])
        assert f.array(name).shape == (cfg.vocab, 3 * 18)
    assert summarize(f)["embedding_type"] == gtype.name


@pytest.mark.parametrize("arch,out_ranks", [("llama", None), ("qwen2", (20,)), ("gemma3", None)])
def test_binary_factored_tables_round_trip(tmp_path, arch, out_ranks):
    path = tmp_path / "m.nq"
    cfg = tiny_config(arch)  # hidden 72, vocab 91: neither a multiple of 32
    emb = LinearPlan((40, 9), has_mid=True)
    out = None if out_ranks is None else LinearPlan(out_ranks, has_mid=True)
    written = write_random(path, cfg, embedding_type=emb, output_type=out, seed=4)
    f = open_nq(path)
    f.verify()
    assert K.TOKEN_EMBD not in f.tensors and K.OUTPUT not in f.tensors
    assert f.tables[K.EMBD_TABLE] == emb
    assert f.tables.get(K.OUTPUT_TABLE) == (None if cfg.tie_embeddings else out)
    for name, arr in written.items():
        np.testing.assert_array_equal(f.array(name), arr, err_msg=name)
    table = f.factored_table(K.EMBD_TABLE)
    assert (table.m, table.n, table.bias) == (cfg.vocab, cfg.hidden, None)
    assert [p.rank for p in table.paths] == [40, 9]
    assert table.paths[1].u_signs.shape == (cfg.vocab, 1) and table.paths[0].v_signs.shape == (40, 3)
    np.testing.assert_array_equal(table.paths[0].scale_out, written[K.table_path_tensor(K.EMBD_TABLE, 0, K.SCALE_OUT)])
    assert summarize(f)["embedding_type"] == "binary-factored, ranks [40, 9]"
    with pytest.raises(KeyError):
        open_nq(path).array(K.TOKEN_EMBD)


@pytest.mark.parametrize("gtype", [GGMLType.Q4_0, GGMLType.IQ4_NL])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied, untied
def test_hot_row_tables_round_trip(tmp_path, arch, gtype):
    path = tmp_path / "m.nq"
    cfg = tiny_config(arch, hidden=96, n_heads=4, head_dim=24)
    kind = HotRows(gtype, 17)
    written = write_random(path, cfg, embedding_type=kind)
    f = open_nq(path)
    f.verify()
    assert f.tables[K.EMBD_TABLE] == kind and f.tables.get(K.OUTPUT_TABLE) == (None if cfg.tie_embeddings else kind)
    for table in [K.EMBD_TABLE] + ([] if cfg.tie_embeddings else [K.OUTPUT_TABLE]):
        cold, ids, hot = f.hot_table(table)
        assert f.tensors[K.dense_table_tensor(table)].shape == (cfg.vocab - 17, 96)
        assert cold.shape == (cfg.vocab - 17, 3 * 18)
        assert f.tensors[K.hot_rows_tensor(table)].gtype == GGMLType.Q8_0 and hot.shape == (17, 3 * 34)
        np.testing.assert_array_equal(ids, written[K.hot_ids_tensor(table)].astype(np.int64))
        assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0)
    assert summarize(f)["embedding_type"] == f"{gtype.name} + 17 Q8_0 rows"
    dump = {t.name: t for t in GGUFReader(path).tensors}  # gguf-py reads every part
    assert dump[K.TOKEN_EMBD].tensor_type == GGMLQuantizationType(gtype)
    assert list(dump["token_embd.hot.weight"].shape) == [96, 17]
    write_random(tmp_path / "plain.nq", cfg, embedding_type=gtype)
    with pytest.raises(KeyError, match="no hot rows"):
        open_nq(tmp_path / "plain.nq").hot_table(K.EMBD_TABLE)


@pytest.mark.parametrize("ids", [[5, 3, 9], [1, 1, 2], [0, 4, 91], [2, 3, 2**31 + 4]])
def test_hot_row_ids_out_of_order_or_range_are_refused_by_writer_and_reader(tmp_path, ids):
    cfg = tiny_config(hidden=96, n_heads=4, head_dim=24)  # vocabulary 91
    kind = HotRows(GGMLType.IQ4_NL, 3)
    w = nqfmt.writer.NQWriter(tmp_path / "w.nq", cfg, *_meta(cfg), _plans(cfg), embedding_type=kind)
    w.write(K.TOKEN_EMBD, quantize_iq4_nl(np.ones((cfg.vocab - 3, 96))))
    w.write("token_embd.hot.weight", quantize(np.ones((3, 96), np.float32), GGMLQuantizationType.Q8_0))
    with pytest.raises(NQFormatError, match="strictly increasing token ids below the vocabulary of 91"):
        w.write("token_embd.hot_ids", np.array(ids, np.uint32))
    w._discard()
    path = tmp_path / "r.nq"
    write_random(path, cfg, embedding_type=kind)
    at = open_nq(path).tensors["token_embd.hot_ids"].offset
    data = bytearray(path.read_bytes())
    data[at:at + 12] = np.array(ids, np.uint32).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(NQFormatError, match="'token_embd.hot_ids': hot row ids must be strictly increasing"):
        open_nq(path)


@pytest.mark.parametrize("kind,out,match", [
    (HotRows(GGMLType.Q8_0, 4), None, "hot rows need a 4-bit type"),
    (HotRows(GGMLType.IQ4_NL, 0), None, "1 to 90 rows"),
    (HotRows(GGMLType.IQ4_NL, 91), None, "1 to 90 rows"),
    (HotRows(GGMLType.IQ4_NL, 4), HotRows(GGMLType.IQ4_NL, 5), "must be stored as the embedding is"),
    (HotRows(GGMLType.IQ4_NL, 4), GGMLType.IQ4_NL, "must be stored as the embedding is"),
])
def test_writer_refuses_impossible_hot_row_plans(tmp_path, kind, out, match):
    cfg = tiny_config("qwen2", hidden=96, n_heads=4, head_dim=24)  # untied, vocabulary 91
    with pytest.raises(NQFormatError, match=match):
        write_random(tmp_path / "m.nq", cfg, embedding_type=kind, output_type=out)
    assert not list(tmp_path.iterdir())


def test_dense_table_is_not_a_factored_one(tmp_path):
    write_random(tmp_path / "m.nq")
    with pytest.raises(KeyError, match="dense"):
        open_nq(tmp_path / "m.nq").factored_table(K.EMBD_TABLE)


def test_gguf_dump_reads_the_compact_tables(tmp_path):
    cfg = tiny_config("qwen2", hidden=64, n_heads=4, head_dim=16)
    write_random(tmp_path / "q4.nq", cfg, embedding_type=GGMLType.Q4_0)
    write_random(tmp_path / "iq4.nq", cfg, embedding_type=GGMLType.IQ4_NL)
    write_random(tmp_path / "bin.nq", cfg, embedding_type=LinearPlan((33,)))
    for name, gtype in (("q4.nq", GGMLType.Q4_0), ("iq4.nq", GGMLType.IQ4_NL)):
        emb = next(t for t in GGUFReader(tmp_path / name).tensors if t.name == K.TOKEN_EMBD)
        assert emb.tensor_type == GGMLQuantizationType(gtype) and list(emb.shape) == [64, cfg.vocab]
        np.testing.assert_array_equal(dequantize(emb.data, GGMLQuantizationType(gtype)),
                                      dequantize_q4(open_nq(tmp_path / name).array(K.TOKEN_EMBD), gtype))
    names = {t.name for t in GGUFReader(tmp_path / "bin.nq").tensors}
    assert {"token_embd.p0.u_signs", "output.p0.scale_out"} <= names
    dump = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_dump", str(tmp_path / "q4.nq")],
                          capture_output=True, text=True)
    assert dump.returncode == 0 and "Q4_0" in dump.stdout


# --- what the writer refuses --------------------------------------------------------------------------------------
@pytest.mark.parametrize("etype", [GGMLType.Q4_0, GGMLType.IQ4_NL, GGMLType.Q8_0])
def test_block_types_need_rows_of_whole_blocks(tmp_path, etype):
    with pytest.raises(NQFormatError, match=f"{etype.name} needs a hidden size divisible by 32, got 72"):
        write_random(tmp_path / "m.nq", tiny_config(), embedding_type=etype)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("emb,out,match", [
    (GGMLType.F16, LinearPlan((8,)), "must be stored as the embedding is"),
    (LinearPlan((8,)), GGMLType.F16, "must be stored as the embedding is"),
    (GGMLType.F16, GGMLType.Q8_0, "must be stored as the embedding is"),
    (LinearPlan((73,)), None, r"token_embd.p0: rank 73 outside 1..min\(m, n\) = 72"),
    (LinearPlan((8,) * 9), None, "token_embd: 9 binary paths"),
    (GGMLType.I32, None, "token_embd.weight: type I32 not allowed"),
])
def test_writer_refuses_impossible_table_plans(tmp_path, emb, out, match):
    cfg = tiny_config("qwen2", hidden=72)
    with pytest.raises(NQFormatError, match=match):
        write_random(tmp_path / "m.nq", cfg, embedding_type=emb, output_type=out)


def test_writer_checks_table_sign_padding(tmp_path):
    cfg = tiny_config()
    w = nqfmt.writer.NQWriter(tmp_path / "m.nq", cfg, *_meta(cfg), _plans(cfg), embedding_type=LinearPlan((20,)))
    bad = np.zeros((20, 3), np.uint32)
    bad[0, 2] = 1 << 9  # column 73 of a 72-column row
    with pytest.raises(NQFormatError, match="token_embd.p0.v_signs.*padding"):
        w.write("token_embd.p0.v_signs", bad)
    w._discard()


# --- what the reader refuses: files written with a plan edited behind the writer's back -----------------------------
def _meta(cfg):
    from synthetic import TINY_TOKENIZER, provenance
    from nqfmt import TokenizerInfo
    return TokenizerInfo(TINY_TOKENIZER, None, bos_id=0, eos_id=1), provenance(source_params=cfg.parameter_count())


def _plans(cfg, rank=8):
    return [{lin: LinearPlan((min(rank, *cfg.linear_shape(lin)),)) for lin in K.LINEARS} for _ in range(cfg.n_layers)]


def _edited(tmp_path, monkeypatch, cfg, edit, **kinds):
    """A file written from the plan for the embedding's kind alone, edited by `edit` (the head's kind, when given,
    only tells the writer how many columns its signs have)."""
    real = nqfmt.writer.file_specs
    monkeypatch.setattr(nqfmt.writer, "file_specs",
                        lambda config, linears, emb, out=None: _with_checksums(edit(real(config, linears, emb)[:-1])))
    path = tmp_path / "edited.nq"
    write_random(path, cfg, **kinds)
    monkeypatch.setattr(nqfmt.writer, "file_specs", real)
    return path


def _with_checksums(specs):
    return specs + [TensorSpec(K.CHECKSUMS, (len(specs) + 1,), GGMLType.I32)]


def _replace(name, spec):
    return lambda specs: [spec if s.name == name else s for s in specs]


def test_reader_refuses_both_kinds_at_once(tmp_path, monkeypatch):
    cfg = tiny_config()
    extra = TensorSpec(K.TOKEN_EMBD, (cfg.vocab, cfg.hidden), GGMLType.F16)
    path = _edited(tmp_path, monkeypatch, cfg, lambda s: [extra] + s, embedding_type=LinearPlan((16,)))
    with pytest.raises(NQFormatError, match="dense or binary-factored, not both"):
        open_nq(path)


def test_reader_refuses_a_missing_table(tmp_path, monkeypatch):
    cfg = tiny_config()
    path = _edited(tmp_path, monkeypatch, cfg, lambda s: [t for t in s if t.name != K.TOKEN_EMBD])
    with pytest.raises(NQFormatError, match="'token_embd.weight' is missing"):
        open_nq(path)


def test_reader_refuses_a_head_of_another_kind(tmp_path, monkeypatch):
    cfg = tiny_config("qwen2")
    head = _factored_specs(cfg, K.OUTPUT_TABLE, 8)

    def edit(specs):
        i = next(i for i, s in enumerate(specs) if s.name == K.OUTPUT)
        return specs[:i] + head + specs[i + 1:]
    path = _edited(tmp_path, monkeypatch, cfg, edit, output_type=LinearPlan((8,)))
    with pytest.raises(NQFormatError, match="must be stored as the embedding is"):
        open_nq(path)


def _factored_specs(cfg, table, rank):
    from nqfmt.layout import table_specs
    return table_specs(cfg, table, LinearPlan((rank,)))


def test_reader_refuses_a_tied_model_with_a_head(tmp_path, monkeypatch):
    import synthetic
    cfg = tiny_config()
    head = _factored_specs(cfg, K.OUTPUT_TABLE, 8)
    real = synthetic.sign_columns  # a tied writer knows no head: say how many columns its signs have

    def columns(name, *a):
        return (8 if name.endswith(K.U_SIGNS) else 72) if name.startswith("output.") else real(name, *a)
    monkeypatch.setattr(synthetic, "sign_columns", columns)
    monkeypatch.setattr(nqfmt.writer, "sign_columns", columns)
    path = _edited(tmp_path, monkeypatch, cfg, lambda s: s + head, embedding_type=LinearPlan((16,)))
    with pytest.raises(NQFormatError, match="unexpected tensor 'output.p0.v_signs'"):
        open_nq(path)


def test_reader_refuses_a_misshapen_factored_table(tmp_path, monkeypatch):
    cfg = tiny_config()
    bad = TensorSpec("token_embd.p0.u_signs", (cfg.vocab - 1, 1), GGMLType.I32)
    path = _edited(tmp_path, monkeypatch, cfg, _replace(bad.name, bad), embedding_type=LinearPlan((16,)))
    with pytest.raises(NQFormatError, match=r"'token_embd.p0.u_signs': I32\[90, 1\] where the config needs I32\[91, 1\]"):
        open_nq(path)


def test_reader_refuses_q4_0_rows_that_are_not_whole_blocks(tmp_path, monkeypatch):
    cfg = tiny_config(hidden=96, n_heads=4, head_dim=24)
    bad = TensorSpec(K.TOKEN_EMBD, (cfg.vocab, 80), GGMLType.Q4_0)  # 80 % 32 != 0: GGUF cannot even size it

    def edit(specs):
        return [TensorSpec(K.TOKEN_EMBD, (cfg.vocab, 64), GGMLType.Q4_0) if s.name == K.TOKEN_EMBD else s
                for s in specs]
    path = _edited(tmp_path, monkeypatch, cfg, edit, embedding_type=GGMLType.Q4_0)
    with pytest.raises(NQFormatError, match=r"'token_embd.weight': Q4_0\[91, 64\] where the config needs "
                                            r"Q4_0\[91, 96\]"):
        open_nq(path)
    data = bytearray(path.read_bytes())  # the tensor info's ne0 (64) rewritten to 80: rows of partial blocks
    at = data.index(K.TOKEN_EMBD.encode()) + len(K.TOKEN_EMBD) + 4
    assert int.from_bytes(data[at:at + 8], "little") == 64
    data[at:at + 8] = (80).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(NQFormatError, match="Q4_0 rows must be a multiple of 32"):
        open_nq(path)
    assert bad.shape[1] % 32


def test_reader_refuses_nonfinite_table_scales_and_dirty_padding(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "m.nq"
    written = write_random(path, cfg, embedding_type=LinearPlan((20,)))
    f = open_nq(path)
    offsets = {name: f.tensors[name].offset for name in written}
    del f
    data = bytearray(path.read_bytes())
    scale = offsets["token_embd.p0.scale_out"] + 2 * 5
    nan = bytearray(data)
    nan[scale:scale + 2] = np.array([np.nan], np.float16).tobytes()
    path.write_bytes(bytes(nan))
    with pytest.raises(NQFormatError, match="header checksum|'token_embd.p0.scale_out': non-finite scale"):
        open_nq(path)
    dirty = bytearray(data)
    word = offsets["token_embd.p0.v_signs"] + 4 * 2  # row 0, last word: columns 64..95, only 64..71 are real
    dirty[word + 3] |= 0x80
    path.write_bytes(bytes(dirty))
    with pytest.raises(NQFormatError, match="'token_embd.p0.v_signs': padding bits past the last column"):
        open_nq(path)
