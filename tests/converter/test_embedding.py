"""The converter's compact embedding and head (converter/embedding.py, spec/CONVERTER.md "Embedding and head"): the
--embedding choices, Q4_0's weighted scale search, the binary factorization, and whole conversions whose file equals
the converter's final model, the head as the file stores it."""
import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from typer.testing import CliRunner

import hf_tiny
from converter import embedding as E
from converter import pipeline as P
from converter.admm import AdmmSettings
from converter.cli import app
from converter.torch_model import load_nq
from nqfmt import HotRows, LinearPlan, ModelConfig, open_nq
from nqfmt import keys as K
from nqfmt.q4 import dequantize_q4, quantize_iq4_nl, unpack_q4
from nqfmt.q8_0 import dequantize_q8_0
from test_pipeline import calib_text, run, tiny_preset  # noqa: F401  (fixture)


def config(hidden=72, vocab=91) -> ModelConfig:
    return ModelConfig(arch="llama", n_layers=1, hidden=hidden, n_heads=3, n_kv_heads=1, head_dim=24, ffn=100,
                       vocab=vocab, context_length=64, norm_eps=1e-6, rope_theta=1e4, tie_embeddings=True)


@pytest.mark.parametrize("text,want", [("f16", "f16"), ("Q4_0", "q4_0"), (" q8_0 ", "q8_0"), ("binary", "binary"),
                                       ("IQ4_NL", "iq4_nl"),
                                       ("binary:064", "binary:64"), ("binary:576X2", "binary:576x2"),
                                       ("binary:64x1", "binary:64"), ("IQ4_NL+0512", "iq4_nl+512"),
                                       ("q4_0+3", "q4_0+3")])
def test_parse_embedding(text, want):
    assert E.parse_embedding(text) == want


@pytest.mark.parametrize("text", ["q4", "int4", "binary:", "binary:0", "binary:-3", "binary:x", "q4_0:32", "",
                                  "binary:x2", "binary:64x0", "binary:64x", "binary:64x2x2", "q8_0+4", "f16+4",
                                  "iq4_nl+", "iq4_nl+0", "iq4_nl+-2", "iq4_nl+4x", "binary+4"])
def test_parse_embedding_refuses(text):
    with pytest.raises(E.EmbeddingChoiceError, match="--embedding"):
        E.parse_embedding(text)


def test_resolve_embedding_against_the_model():
    assert E.resolve_embedding("q4_0", config(hidden=96), explicit=True) == "q4_0"
    assert E.resolve_embedding("q4_0", config(hidden=72), explicit=False) == "f16"  # a preset's default falls back
    with pytest.raises(E.EmbeddingChoiceError, match="rows of 72 values are not whole blocks of 32"):
        E.resolve_embedding("q8_0", config(hidden=72), explicit=True)
    assert E.resolve_embedding("binary:72", config(hidden=72), explicit=True) == "binary:72"
    with pytest.raises(E.EmbeddingChoiceError, match="rank 73 is above min"):
        E.resolve_embedding("binary:73", config(hidden=72), explicit=True)
    assert E.binary_rank("binary", config(hidden=72, vocab=50)) == 50
    assert E.binary_rank("binary:40x3", config()) == 40 and E.binary_paths("binary:40x3") == 3
    assert E.binary_paths("binary:40") == E.binary_paths("binary") == 1
    with pytest.raises(E.EmbeddingChoiceError, match="at most 8 paths"):
        E.resolve_embedding("binary:8x9", config(), explicit=True)
    assert E.resolve_embedding("iq4_nl+90", config(hidden=96), explicit=True) == "iq4_nl+90"
    with pytest.raises(E.EmbeddingChoiceError, match="91 hot rows leave none of the vocabulary of 91"):
        E.resolve_embedding("iq4_nl+91", config(hidden=96), explicit=True)
    assert E.resolve_embedding("iq4_nl+91", config(hidden=96), explicit=False) == "q8_0"  # every row hot
    assert E.resolve_embedding("iq4_nl+91", config(hidden=72), explicit=False) == "f16"
    with pytest.raises(E.EmbeddingChoiceError, match="not whole blocks"):
        E.resolve_embedding("q4_0+4", config(hidden=72), explicit=True)


def test_table_bits():
    c = config(hidden=96, vocab=1000)
    assert E.table_bits("f16", c) == 16 and E.table_bits("q8_0", c) == 8.5 and E.table_bits("q4_0", c) == 4.5
    assert E.table_bits("binary:32", c) == pytest.approx((32 * 1096 + 16 * 1096) / 96_000)
    assert E.table_bits("binary:32x2", c) == pytest.approx(2 * E.table_bits("binary:32", c))
    assert E.table_bits("iq4_nl+100", c) == pytest.approx((900 * 4.5 * 96 + 100 * (8.5 * 96 + 32)) / 96_000)


def _weighted_error(raw, w, col, gtype=K.GGMLType.Q4_0):
    return float((((dequantize_q4(raw, gtype) - w.numpy()) * col.numpy()) ** 2).sum())


def test_q4_0_search_beats_ggml_reference_rule():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=g) * torch.rand(300, 1, generator=g)
    ggml = quantize(w.numpy(), GGMLQuantizationType.Q4_0)
    plain = E.quantize_q4(w, None, K.GGMLType.Q4_0)
    assert plain.shape == ggml.shape and plain.dtype == np.uint8
    ones = torch.ones(96)
    assert _weighted_error(plain, w, ones) < 0.92 * _weighted_error(ggml, w, ones)
    col = torch.rand(96, generator=g) * 2 + 0.1
    ours = E.quantize_q4(w, col, K.GGMLType.Q4_0)
    assert _weighted_error(ours, w, col) < 0.85 * _weighted_error(ggml, w, col)
    assert _weighted_error(ours, w, col) < 0.95 * _weighted_error(plain, w, col)  # the weights steer the search
    d, q = unpack_q4(ours)
    assert q.max() <= 15 and np.isfinite(d.astype(np.float32)).all()


def test_iq4_nl_search_beats_the_plain_rule_and_q4_0():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=g) * torch.rand(300, 1, generator=g)
    col = torch.rand(96, generator=g) * 2 + 0.1
    iq4 = K.GGMLType.IQ4_NL
    ours = E.quantize_q4(w, col, iq4)
    plain = quantize_iq4_nl(w.numpy())
    assert _weighted_error(ours, w, col, iq4) < 0.85 * _weighted_error(plain, w, col, iq4)
    q4 = E.quantize_q4(w, col, K.GGMLType.Q4_0)
    assert _weighted_error(ours, w, col, iq4) < 0.9 * _weighted_error(q4, w, col)  # the grid suits Gaussian rows


def test_q4_0_of_a_zero_block_is_zero():
    w = torch.randn(3, 64)
    w[1, :32] = 0
    out = dequantize_q4(E.quantize_q4(w, None, K.GGMLType.Q4_0), K.GGMLType.Q4_0)
    assert (out[1, :32] == 0).all() and (out[1, 32:] != 0).any()


def test_factorized_table_rows_are_its_matrix_rows():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(91, 72, generator=g)
    lin = E.factorize(w, 40, torch.rand(72, generator=g) + 0.5, torch.rand(91, generator=g) + 0.5,
                      AdmmSettings(iterations=10), seed=0)
    assert lin.signs_frozen and lin.ranks == (40,)
    ids = torch.tensor([[3, 90, 3], [0, 7, 45]])
    dense = lin.dense_weight()
    torch.testing.assert_close(lin.rows(ids), dense[ids], rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 72, generator=g)
    torch.testing.assert_close(lin(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    err = float(((w - dense) ** 2).sum() / (w ** 2).sum())
    assert err < 0.6  # rank 40 of 72, one bit per sign: a real approximation, not noise


def test_residual_paths_fit_what_the_earlier_ones_leave():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(91, 72, generator=g)
    cols, rows = torch.rand(72, generator=g) + 0.5, torch.rand(91, generator=g) + 0.5
    one = E.factorize(w, 24, cols, rows, AdmmSettings(iterations=10), seed=0)
    two = E.factorize(w, 24, cols, rows, AdmmSettings(iterations=10), seed=0, paths=2)
    assert two.ranks == (24, 24) and two.signs_frozen
    torch.testing.assert_close(two.paths[0].dense_weight(), one.paths[0].dense_weight(), rtol=0, atol=0)
    err = lambda lin: float((((w - lin.dense_weight()) * rows[:, None] * cols).pow(2)).sum())  # noqa: E731
    assert err(two) < 0.8 * err(one)
    ids = torch.tensor([0, 90, 5])
    torch.testing.assert_close(two.rows(ids), two.dense_weight()[ids], rtol=1e-5, atol=1e-6)
    back = E.StoredTable.from_state(E.StoredTable(None, module=two).state())
    assert back.kind == LinearPlan((24, 24)) and torch.equal(back.module.dense_weight(), two.dense_weight())


def test_row_and_column_weights():
    windows = torch.tensor([[1, 1, 1, 2], [1, 2, 3, 1]])
    rows = E.row_weights(windows, 6, gamma=0.4)
    assert rows.shape == (6,) and rows.mean() == pytest.approx(1.0)
    assert rows[1] > rows[2] > rows[3] > rows[0] == rows[4] == rows[5] > 0
    hidden = torch.randn(3, 5, 8)
    hidden[..., 2] *= 10
    norm = torch.nn.Identity()
    cols = E.column_weights(norm, hidden, gamma=0.4)
    assert cols.argmax() == 2 and cols.mean() == pytest.approx(1.0)


@pytest.mark.parametrize("stored", [
    E.StoredTable(K.GGMLType.Q4_0, E.quantize_q4(torch.randn(5, 64), None, K.GGMLType.Q4_0)),
    E.StoredTable(K.GGMLType.IQ4_NL, E.quantize_q4(torch.randn(5, 64), None, K.GGMLType.IQ4_NL)),
    E.StoredTable(K.GGMLType.Q8_0, quantize(np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32),
                                                  GGMLQuantizationType.Q8_0)),
    E.StoredTable(None, module=E.factorize(torch.randn(5, 8), 3, None, None, AdmmSettings(iterations=3), 0)),
    E.store_table("iq4_nl+2", torch.randn(5, 64), config(hidden=64, vocab=5), None, None, AdmmSettings(), 0,
                  torch.tensor([3, 9, 0, 9, 1])),
])
def test_stored_table_state_round_trip(stored):
    back = E.StoredTable.from_state(stored.state())
    assert back.kind == stored.kind
    ids = torch.tensor([4, 0, 2])
    a, b = stored.torch_value(), back.torch_value()
    rows = (lambda t: t.rows(ids) if isinstance(t, torch.nn.Module) else t[ids])
    assert torch.equal(rows(a), rows(b))
    assert all(np.array_equal(x, back.export(K.EMBD_TABLE)[k]) for k, x in stored.export(K.EMBD_TABLE).items())


# --- whole conversions ----------------------------------------------------------------------------------------------
def _assert_file_is_the_model(summary, tokens_seed=3):
    loaded = load_nq(summary.out)
    tokens = torch.randint(0, hf_tiny.VOCAB, (2, 10), generator=torch.Generator().manual_seed(tokens_seed))
    with torch.no_grad():
        assert torch.equal(loaded.embed(tokens), summary.model.embed(tokens))
        assert torch.equal(loaded(tokens), summary.model(tokens))
    return loaded


@pytest.mark.parametrize("arch,hidden,choice", [("llama", 96, "q4_0"), ("qwen2", 96, "q4_0"), ("qwen2", 96, "q8_0"),
                                                ("gemma3", 96, "iq4_nl"),
                                                ("llama", 72, "binary:40"), ("qwen2", 72, "binary"),
                                                ("llama", 72, "binary:20x2"),
                                                ("gemma3", 72, "binary:24"), ("llama", 96, "iq4_nl+40"),
                                                ("qwen2", 96, "q4_0+7")])
def test_conversion_file_equals_the_converter_model(arch, hidden, choice, tmp_path, tiny_preset):
    hf_tiny.save(arch, tmp_path / arch, hidden_size=hidden)
    summary = run(tmp_path, tmp_path / arch, embedding=choice)
    nq = open_nq(summary.out)
    nq.verify()
    assert '"embedding":"%s"' % choice in nq.provenance.recipe
    kinds = [nq.tables[t] for t in (K.EMBD_TABLE, K.OUTPUT_TABLE) if t in nq.tables]
    assert len(kinds) == (1 if nq.config.tie_embeddings else 2)
    for kind in kinds:
        if choice.startswith("binary"):
            assert kind == LinearPlan((E.binary_rank(choice, nq.config),) * E.binary_paths(choice))
        elif E.hot_rows(choice):
            assert kind == HotRows(E.DENSE[E.base_type(choice)], E.hot_rows(choice))
        else:
            assert kind == E.DENSE[choice]
    _assert_file_is_the_model(summary)


def test_distillation_tunes_the_factored_tables_scales(tmp_path, tiny_preset):
    hf_tiny.save("qwen2", tmp_path / "src")  # untied: the embedding and the head are two factored tables
    tuned = run(tmp_path, tmp_path / "src", "tuned.nq", embedding="binary:30")
    untuned = run(tmp_path, tmp_path / "src", "untuned.nq", embedding="binary:30", model_recon=False)
    a, b = open_nq(tuned.out), open_nq(untuned.out)
    for table in (K.EMBD_TABLE, K.OUTPUT_TABLE):
        signs = K.table_path_tensor(table, 0, K.U_SIGNS)
        assert np.array_equal(a.array(signs), b.array(signs))  # the signs are the factorization's, frozen
        scale = K.table_path_tensor(table, 0, K.SCALE_OUT)
        assert not np.array_equal(a.array(scale), b.array(scale))
    assert "embedding" in tuned.stage_seconds


@pytest.mark.parametrize("choice", ["q4_0", "iq4_nl+9"])
def test_distillation_leaves_a_4bit_table_as_stored(tmp_path, tiny_preset, choice):
    """A 4-bit table's scales are fixed (tuning them made held-out perplexity worse): with or without model
    reconstruction the file holds the same table bytes, while the decoder's scales do move."""
    hf_tiny.save("qwen2", tmp_path / "src", hidden_size=96)
    tuned = run(tmp_path, tmp_path / "src", "tuned.nq", embedding=choice)
    untuned = run(tmp_path, tmp_path / "src", "untuned.nq", embedding=choice, model_recon=False)
    a, b = open_nq(tuned.out), open_nq(untuned.out)
    for name in (K.TOKEN_EMBD, K.OUTPUT, "token_embd.hot.weight", "output.hot.weight"):
        if name in b.tensors:
            assert np.array_equal(a.array(name), b.array(name))
    scale = K.path_tensor(0, K.ATTN_Q, 0, K.SCALE_OUT)
    assert not np.array_equal(a.array(scale), b.array(scale))


@pytest.mark.parametrize("gtype", [K.GGMLType.Q4_0, K.GGMLType.IQ4_NL])
def test_hot_rows_table_holds_the_frequent_rows_at_q8_0_and_the_model_sees_what_the_file_holds(gtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 64, generator=g)
    counts = torch.randint(0, 5, (37,), generator=g)
    counts[[30, 4, 11]] = torch.tensor([50, 40, 40])  # the 3 most frequent: 30 alone, then 4 and 11 tie
    stored = E.store_table(f"{gtype.name.lower()}+3", w, config(hidden=64, vocab=37), None, None, AdmmSettings(), 0,
                           counts)
    assert stored.kind == HotRows(gtype, 3) and list(stored.hot_ids) == [4, 11, 30]
    assert np.array_equal(E.hot_ids(counts, 2), [4, 30])  # a tie goes to the lower id
    parts = stored.export(K.EMBD_TABLE)
    assert parts["token_embd.hot_ids"].dtype == np.uint32
    want = torch.empty(37, 64)  # the spec's rule: hot rows by id, the rest in token order
    others = [t for t in range(37) if t not in (4, 11, 30)]
    want[others] = torch.from_numpy(dequantize_q4(parts[K.TOKEN_EMBD], gtype))
    want[[4, 11, 30]] = torch.from_numpy(dequantize_q8_0(parts["token_embd.hot.weight"]))
    assert torch.equal(want[[4, 11, 30]], torch.from_numpy(dequantize_q8_0(quantize(
        w[[4, 11, 30]].numpy(), GGMLQuantizationType.Q8_0))))
    assert torch.equal(stored.torch_value(), want)


@pytest.mark.parametrize("gtype", [K.GGMLType.Q4_0, K.GGMLType.IQ4_NL])
def test_4bit_table_is_seen_as_the_file_holds_it(gtype):
    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(2))
    stored = E.store_table(gtype.name.lower(), w, config(hidden=64, vocab=37), None, None, AdmmSettings(), 0)
    assert stored.kind == gtype
    assert torch.equal(stored.torch_value(), torch.from_numpy(dequantize_q4(stored.export(K.EMBD_TABLE)[K.TOKEN_EMBD],
                                                                            gtype)))


def test_q4_0_default_falls_back_to_f16_where_rows_are_not_whole_blocks(tmp_path, tiny_preset, monkeypatch):
    monkeypatch.setitem(P.PRESETS, "tiny", dataclasses.replace(P.PRESETS["tiny"], embedding="q4_0"))
    hf_tiny.save("llama", tmp_path / "src")  # hidden 72
    summary = run(tmp_path, tmp_path / "src")
    nq = open_nq(summary.out)
    assert nq.tables[K.EMBD_TABLE] == K.GGMLType.F16 and '"embedding":"f16"' in nq.provenance.recipe
    with pytest.raises(E.EmbeddingChoiceError, match="not whole blocks"):
        run(tmp_path, tmp_path / "src", "explicit.nq", embedding="q4_0")
    assert not (tmp_path / "explicit.nq").exists()


def test_resume_with_a_factored_table_is_byte_identical(tmp_path, tiny_preset, monkeypatch):
    hf_tiny.save("llama", tmp_path / "src")
    reference = run(tmp_path, tmp_path / "src", "ref.nq", embedding="binary:33").out.read_bytes()
    save = P.WorkDir.save

    def interrupting_save(self, name, obj):
        save(self, name, obj)
        if name == "tables":
            raise KeyboardInterrupt

    monkeypatch.setattr(P.WorkDir, "save", interrupting_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tmp_path / "src", "m.nq", embedding="binary:33")
    monkeypatch.setattr(P.WorkDir, "save", save)
    resumed = run(tmp_path, tmp_path / "src", "m.nq", embedding="binary:33", resume=True)
    assert resumed.out.read_bytes() == reference
    with pytest.raises(KeyboardInterrupt):  # and another choice is other settings
        monkeypatch.setattr(P.WorkDir, "save", interrupting_save)
        run(tmp_path, tmp_path / "src", "n.nq", embedding="binary:33")
    monkeypatch.setattr(P.WorkDir, "save", save)
    with pytest.raises(P.WorkDirError, match="other settings"):
        run(tmp_path, tmp_path / "src", "n.nq", embedding="binary:32", resume=True)


@pytest.mark.parametrize("value,match", [("q5", "choose one of"), ("binary:999", "rank 999 is above"),
                                         ("q4_0", "not whole blocks")])
def test_cli_refuses_a_bad_embedding_in_one_line(tmp_path, value, match):
    hf_tiny.save("llama", tmp_path / "llama")
    result = CliRunner().invoke(app, [str(tmp_path / "llama"), str(tmp_path / "m.nq"), "--embedding", value,
                                      "--calib", str(calib_text(tmp_path / "c.txt")), "--samples", "4"])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("nqconvert: error: "), result.output
    assert match in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "llama"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_nq_reads_multi_path_factored_tables(tmp_path, arch):
    """Files the converter does not write yet (two paths, scale_mid) still load as the spec's formula says."""
    from synthetic import tiny_config, write_random
    from nqfmt import unpack_signs
    cfg = tiny_config(arch)
    written = write_random(tmp_path / "m.nq", cfg, embedding_type=LinearPlan((40, 9), has_mid=True),
                           output_type=None if cfg.tie_embeddings else LinearPlan((20,), has_mid=True))
    model = load_nq(tmp_path / "m.nq")
    for table in model.scaled_tables():
        assert table.signs_frozen
    ids = torch.tensor([0, 90, 17, 17])
    want = np.zeros((4, cfg.hidden))
    for p, r in enumerate((40, 9)):
        part = lambda x: written[K.table_path_tensor(K.EMBD_TABLE, p, x)]  # noqa: E731
        u = unpack_signs(part(K.U_SIGNS), r, np.float64)[ids.numpy()]
        v = unpack_signs(part(K.V_SIGNS), cfg.hidden, np.float64)
        mid, s_in, s_out = (part(x).astype(np.float64) for x in (K.SCALE_MID, K.SCALE_IN, K.SCALE_OUT))
        want += s_out[ids.numpy(), None] * ((u * mid) @ v) * s_in
    with torch.no_grad():
        got = model.embed(ids) / cfg.embedding_scale
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
