"""bench/synthetic_model.py: random models of real shapes for both engines, checked at one-layer size."""
import math

import numpy as np
import pytest
from gguf import GGUFReader

import runtime
from bench.synthetic_model import (LLAMA2_7B, QWEN25_1_5B, SMOLLM2_135M, gguf_vocab, parse_table, tiny_shapes,
                                   write_gguf_f16, write_nq)
from nqfmt import LinearPlan, open_nq
from nqfmt import keys as K
from nqfmt.keys import GGMLType

TINY_QWEN = tiny_shapes(QWEN25_1_5B)
TINY_SMOL = tiny_shapes(SMOLLM2_135M)


@pytest.mark.parametrize("shapes", [TINY_SMOL, TINY_QWEN, dict(TINY_QWEN, tie_embeddings=False)],
                         ids=["llama", "qwen2", "qwen2-untied"])
@pytest.mark.parametrize("embedding", ["f16", "q8_0", "q4_0", "iq4_nl", "binary:24x2"])
def test_nq_file_holds_the_shapes_and_runs(tmp_path, shapes, embedding):
    kind = parse_table(embedding, shapes["hidden"])
    path = write_nq(tmp_path / "m.nq", shapes, kind)
    f = open_nq(path)
    cfg = f.config
    assert (cfg.arch, cfg.hidden, cfg.vocab, cfg.attention_bias, cfg.tie_embeddings) == (
        shapes["arch"], shapes["hidden"], shapes["vocab"], shapes.get("attention_bias", False),
        shapes["tie_embeddings"])
    assert f.tables[K.EMBD_TABLE] == kind
    assert all(len(plan.ranks) == 1 for block in f.linears for plan in block.values())
    m = runtime.load(path, backend="numpy", n_ctx=32)
    logits, _ = m.generator.prefill([3, 1, 4, 1, 5])
    assert logits.shape[-1] == shapes["vocab"] and np.isfinite(logits).all() and np.abs(logits).max() > 0


def test_parse_table():
    assert parse_table("iq4_nl", 64) == GGMLType.IQ4_NL
    assert parse_table("binary", 64) == LinearPlan((64,))
    assert parse_table("binary:32", 64) == LinearPlan((32,))
    assert parse_table("binary:16x3", 64) == LinearPlan((16, 16, 16))
    for bad in ("q4_k", "binary:", "binary:0", "binary:8x", "binary:ax2", "binary:8x0"):
        with pytest.raises(ValueError):
            parse_table(bad, 64)


def test_gguf_f16_holds_what_llama_cpp_reads(tmp_path):
    """Tensor names, shapes (ggml order: columns first) and types of llama.cpp's qwen2 graph, written out by hand."""
    path = write_gguf_f16(tmp_path / "m.gguf", TINY_QWEN)
    r = GGUFReader(path)
    h, q, kv, ffn, v = 64, 2 * 32, 32, 96, 512
    expected = {"token_embd.weight": ([h, v], "F16"), "output_norm.weight": ([h], "F32"),
                "blk.0.attn_norm.weight": ([h], "F32"), "blk.0.ffn_norm.weight": ([h], "F32"),
                "blk.0.attn_q.weight": ([h, q], "F16"), "blk.0.attn_q.bias": ([q], "F32"),
                "blk.0.attn_k.weight": ([h, kv], "F16"), "blk.0.attn_k.bias": ([kv], "F32"),
                "blk.0.attn_v.weight": ([h, kv], "F16"), "blk.0.attn_v.bias": ([kv], "F32"),
                "blk.0.attn_output.weight": ([q, h], "F16"), "blk.0.ffn_gate.weight": ([h, ffn], "F16"),
                "blk.0.ffn_up.weight": ([h, ffn], "F16"), "blk.0.ffn_down.weight": ([ffn, h], "F16")}
    got = {t.name: ([int(x) for x in t.shape], t.tensor_type.name) for t in r.tensors}
    assert got == expected
    fields = r.fields
    text = lambda key: bytes(fields[key].parts[fields[key].data[0]]).decode()
    scalar = lambda key: fields[key].parts[fields[key].data[0]][0]
    assert text("general.architecture") == "qwen2" and text("tokenizer.ggml.model") == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == v
    assert math.isclose(scalar("qwen2.rope.freq_base"), 1e6) and scalar("qwen2.block_count") == 1
    assert scalar("qwen2.attention.head_count_kv") == 1
    emb = next(t for t in r.tensors if t.name == "token_embd.weight").data
    assert np.isfinite(emb).all() and emb.std() > 0.01


def test_gguf_vocab_is_unique_and_starts_with_the_bytes():
    tokens = gguf_vocab(1000)
    assert len(tokens) == len(set(tokens)) == 1000 and "Ċ" in tokens[:256] and tokens[256] == "Ġt"


@pytest.mark.parametrize("shapes", [TINY_QWEN, dict(tiny_shapes(LLAMA2_7B), n_kv_heads=2)],
                         ids=["qwen2", "llama-untied"])
def test_llama_cpp_quantizes_and_runs_the_gguf(tmp_path, shapes):
    """The GGUF goes through llama.cpp as bench/speed.py uses it: llama_model_quantize to Q4_0, then a fresh process
    prefills and decodes; the tied or untied head is where llama.cpp looks for it."""
    pytest.importorskip("llama_cpp")
    from bench import speed
    f16 = write_gguf_f16(tmp_path / "m-f16.gguf", shapes)
    q40 = speed.quantize(f16, tmp_path / "m-q4_0.gguf", "LLAMA_FTYPE_MOSTLY_Q4_0")
    assert speed.gguf_tensor_types(q40).get("Q4_0", 0) >= 7
    r = speed.run_worker("llama", str(q40), 1, 4, [5, 9, 300, 7, 11], "no-repack")
    assert r["decode_tokens"] == 4 and len(r["generated"]) == 5
    assert all(0 <= t < shapes["vocab"] for t in r["generated"])


def test_both_workers_decode_after_a_prompt_longer_than_a_batch(tmp_path):
    """bench/probes/long_context.py's runs: a prompt past llama-cpp-python's 512-token batch, then decoding, through
    both engines' workers (llama-cpp-python keeps logits only for positions below n_batch, so the worker widens the
    batch to cover the run)."""
    pytest.importorskip("llama_cpp")
    from bench import speed
    shapes = dict(TINY_SMOL, context_length=2048)
    f16 = write_gguf_f16(tmp_path / "m-f16.gguf", shapes)
    q40 = speed.quantize(f16, tmp_path / "m-q4_0.gguf", "LLAMA_FTYPE_MOSTLY_Q4_0")
    nq = write_nq(tmp_path / "m.nq", shapes)
    ids = [(7 * i) % (shapes["vocab"] - 1) + 1 for i in range(speed.LONG_PROMPT + 88)]
    n_ctx = len(ids) + 8
    ours = speed.run_worker("ours", str(nq), 1, 4, ids, None, n_ctx)
    theirs = speed.run_worker("llama", str(q40), 1, 4, ids, "no-repack", n_ctx)
    for r in (ours, theirs):
        assert r["prefill_tokens"] == len(ids) and r["decode_tokens"] == 4 and r["decode_tps"] > 0
        assert len(r["generated"]) == 5 and all(0 <= t < shapes["vocab"] for t in r["generated"])
