import numpy as np
import pytest
from nqfmt.keys import GGMLType
from synthetic import TINY_TOKENIZER, provenance, tiny_config, write_random

from nqfmt import LinearPlan, NQFormatError, NQWriter, TokenizerInfo, open_nq, unpack_signs
from nqfmt import keys as K


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_every_tensor_round_trips_bit_exactly(tmp_path, arch):
    path = tmp_path / "m.nq"
    cfg = tiny_config(arch)
    written = write_random(path, cfg, ranks=(40, 17), has_mid=True, seed=3)
    f = open_nq(path)
    f.verify()
    assert f.config == cfg
    assert set(f.tensors) == set(written) | {K.CHECKSUMS}
    for name, arr in written.items():
        got = f.array(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape, name
        np.testing.assert_array_equal(got, arr, err_msg=name)
    lin = f.linear(1, K.ATTN_V)
    assert (lin.m, lin.n) == cfg.linear_shape(K.ATTN_V)
    assert [p.rank for p in lin.paths] == [24, 17]  # rank 40 capped at min(m, n) = 24 by the plan
    assert (lin.bias is not None) == (arch == "qwen2")
    assert lin.paths[0].scale_mid is not None


@pytest.mark.parametrize("etype", [GGMLType.F32, GGMLType.Q8_0])
def test_other_embedding_types(tmp_path, etype):
    path = tmp_path / "m.nq"
    cfg = tiny_config("qwen2", hidden=96, n_heads=4, head_dim=24)  # Q8_0 needs hidden % 32 == 0; untied head
    written = write_random(path, cfg, embedding_type=etype)
    f = open_nq(path)
    f.verify()
    assert f.tensors[K.TOKEN_EMBD].gtype == etype and f.tensors[K.OUTPUT].gtype == etype
    np.testing.assert_array_equal(f.array(K.OUTPUT), written[K.OUTPUT])


def test_views_are_zero_copy_and_read_only(tmp_path):
    path = tmp_path / "m.nq"
    write_random(path)
    f = open_nq(path)
    a = f.array(K.TOKEN_EMBD)
    assert not a.flags.writeable and not a.flags.owndata
    assert f.array(K.path_tensor(0, K.FFN_UP, 0, K.V_SIGNS)).dtype == np.uint32


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "m.nq"
    write_random(path, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    f = open_nq(path)
    assert f.tokenizer == TokenizerInfo(TINY_TOKENIZER, "{% for m in messages %}{{ m.content }}{% endfor %}", 0, 1,
                                        None, False)
    assert f.provenance == provenance(source_params=f.config.parameter_count())
    assert f.metadata[K.ARCH] == "nanoquant" and f.metadata[K.VERSION] == K.FORMAT_VERSION


def test_signs_decode_to_what_was_packed(tmp_path):
    path = tmp_path / "m.nq"
    rng = np.random.default_rng(7)
    cfg = tiny_config()
    signs = np.where(rng.random((cfg.ffn, 33)) < 0.5, -1.0, 1.0)
    written = write_random(path, cfg, ranks=(33,))
    name = K.path_tensor(0, K.FFN_GATE, 0, K.U_SIGNS)
    written_signs = unpack_signs(written[name], 33)
    np.testing.assert_array_equal(unpack_signs(open_nq(path).array(name), 33), written_signs)
    assert signs.shape == written_signs.shape


def _writer(path, cfg=None):
    cfg = cfg or tiny_config()
    plans = [{lin: LinearPlan((8,)) for lin in K.LINEARS} for _ in range(cfg.n_layers)]
    return NQWriter(path, cfg, TokenizerInfo("{}"), provenance(), plans)


def test_failed_write_leaves_existing_file_untouched(tmp_path):
    path = tmp_path / "m.nq"
    path.write_bytes(b"the user's old file")
    with pytest.raises(RuntimeError):
        with _writer(path) as w:
            w.write(K.TOKEN_EMBD, np.ones((91, 72), np.float16))
            raise RuntimeError("conversion crashed")
    assert path.read_bytes() == b"the user's old file"
    assert not (tmp_path / "m.nq.partial").exists()


def test_incomplete_file_is_never_committed(tmp_path):
    path = tmp_path / "m.nq"
    with pytest.raises(NQFormatError, match="never written"):
        with _writer(path) as w:
            w.write(K.TOKEN_EMBD, np.ones((91, 72), np.float16))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,array,match", [
    ("output_norm.weight", np.ones(72, np.float32), "expected tensor 'token_embd.weight'"),
    (K.TOKEN_EMBD, np.ones((91, 72), np.float32), "plan says float16"),
    (K.TOKEN_EMBD, np.ones((90, 72), np.float16), r"plan says float16\[91, 72\]"),
])
def test_writer_rejects_tensors_off_plan(tmp_path, name, array, match):
    with pytest.raises(NQFormatError, match=match):
        with _writer(tmp_path / "m.nq") as w:
            w.write(name, array)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_non_finite_scales_and_dirty_padding(tmp_path):
    w = _writer(tmp_path / "m.nq")
    w.write(K.TOKEN_EMBD, np.ones((91, 72), np.float16))
    w.write("blk.0.attn_norm.weight", np.ones(72, np.float32))
    w.write("blk.0.ffn_norm.weight", np.ones(72, np.float32))
    with pytest.raises(NQFormatError, match="padding"):
        w.write("blk.0.attn_q.p0.v_signs", np.full((8, 3), 0xFFFFFFFF, np.uint32))
    w.write("blk.0.attn_q.p0.v_signs", np.full((8, 3), 0x7, np.uint32))
    w.write("blk.0.attn_q.p0.u_signs", np.full((72, 1), 0xFF, np.uint32))
    with pytest.raises(NQFormatError, match="finite"):
        w.write("blk.0.attn_q.p0.scale_in", np.array([np.inf] * 72, np.float16))
    w._discard()


def test_writer_refuses_impossible_ranks_and_missing_directory(tmp_path):
    cfg = tiny_config()
    plans = [{lin: LinearPlan((100,)) for lin in K.LINEARS} for _ in range(cfg.n_layers)]
    with pytest.raises(NQFormatError, match="rank 100 outside"):
        NQWriter(tmp_path / "m.nq", cfg, TokenizerInfo("{}"), provenance(), plans)
    with pytest.raises(NQFormatError, match="does not exist"):
        _writer(tmp_path / "nope" / "m.nq")
