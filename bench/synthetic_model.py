"""Random-weight models with real shapes, for speed work: speed does not depend on the values.

Two writers of the same shapes: `write_nq` (our `.nq`: every decoder linear one binary path at a 1.0 bpw target,
the embedding/head as `--embedding` chooses) and `write_gguf_f16` (llama.cpp's GGUF, F16 weights, which
bench/speed.py quantizes with llama.cpp's own quantizer). Both carry a byte-level tokenizer (256 byte tokens, the rest
of the vocabulary fillers): enough to load, since the benchmarks feed token ids.
Usage: python -m bench.synthetic_model OUT [--model qwen2.5-1.5b] [--embedding iq4_nl] [--gguf]
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf.quants import quantize

from nqfmt import HotRows, LinearPlan, ModelConfig, NQWriter, Provenance, TokenizerInfo, pack_signs, rank_for_bits
from nqfmt import keys as K
from nqfmt.keys import GGMLType
from nqfmt.layout import TableKind, sign_columns
from nqfmt.q4 import quantize_iq4_nl, quantize_q4_0

SMOLLM2_135M = dict(arch="llama", n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536,
                    vocab=49152, context_length=8192, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True)
QWEN25_1_5B = dict(arch="qwen2", n_layers=28, hidden=1536, n_heads=12, n_kv_heads=2, head_dim=128, ffn=8960,
                   vocab=151936, context_length=32768, norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=True,
                   attention_bias=True)
LLAMA2_7B = dict(arch="llama", n_layers=32, hidden=4096, n_heads=32, n_kv_heads=32, head_dim=128, ffn=11008,
                 vocab=32000, context_length=4096, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False)
SHAPES = {"smollm2-135m": SMOLLM2_135M, "qwen2.5-1.5b": QWEN25_1_5B, "llama-2-7b": LLAMA2_7B}
TINY = dict(n_layers=1, hidden=64, n_heads=2, n_kv_heads=1, head_dim=32, ffn=96, vocab=512, context_length=256)

DENSE_TABLES = {"f16": GGMLType.F16, "q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0, "iq4_nl": GGMLType.IQ4_NL}
_ROWS_PER_CHUNK = 4096  # rows generated and quantized at a time: a 151936-row table never sits in memory as float64

# a byte-level BPE over single bytes: enough to turn text into ids and ids back into bytes
_BYTES_TOKENIZER = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                        "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": None, "merges": []},
}


def _byte_vocab() -> dict[str, int]:
    """GPT-2's byte→unicode map: 256 printable stand-ins, one token each."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: i for i, c in enumerate(chars)}


def byte_tokenizer_json(special: tuple[str, ...] = ()) -> str:
    """tokenizer.json of a byte-level BPE with one token per byte (ids 0-255) and `special` tokens after them."""
    tok = dict(_BYTES_TOKENIZER)
    tok["model"] = dict(tok["model"], vocab=_byte_vocab())
    tok["added_tokens"] = [{"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, t in enumerate(special)]
    return json.dumps(tok)


def model_config(shapes: dict) -> ModelConfig:
    return ModelConfig(**shapes)


def tiny_shapes(shapes: dict) -> dict:
    """A one-layer model of the same architecture and flags as `shapes` (warms every kernel up cheaply)."""
    return dict(shapes, **TINY)


def parse_table(text: str, hidden: int) -> TableKind:
    """How the embedding/head is stored: f16, q8_0, q4_0, iq4_nl, q4_0+K, iq4_nl+K (K hot rows), binary (one path of
    rank `hidden`), binary:RANK or binary:RANKxPATHS (nqconvert's --embedding spelling)."""
    if text in DENSE_TABLES:
        return DENSE_TABLES[text]
    hot = re.fullmatch(r"(q4_0|iq4_nl)\+(\d+)", text)
    if hot is not None:
        return HotRows(DENSE_TABLES[hot[1]], int(hot[2]))
    m = re.fullmatch(r"binary(?::(\d+)(?:x(\d+))?)?", text)
    if m is None:
        raise ValueError(f"embedding {text!r}: choose one of {', '.join(DENSE_TABLES)}, binary, binary:RANK, "
                         f"binary:RANKxPATHS")
    rank, paths = int(m[1] or hidden), int(m[2] or 1)
    if rank < 1 or paths < 1:
        raise ValueError(f"embedding {text!r}: the rank and the path count must be positive")
    return LinearPlan((rank,) * paths)


def table_name(kind: TableKind) -> str:
    """The --embedding spelling of a table kind (file names and JSON labels)."""
    if isinstance(kind, LinearPlan):
        return f"binary:{kind.ranks[0]}x{len(kind.ranks)}"
    if isinstance(kind, HotRows):
        return f"{GGMLType(kind.gtype).name.lower()}+{kind.rows}"
    return GGMLType(kind).name.lower()


def _normal_rows(rng: np.random.Generator, rows: int, cols: int, std: float) -> Iterator[np.ndarray]:
    for start in range(0, rows, _ROWS_PER_CHUNK):
        yield rng.standard_normal((min(_ROWS_PER_CHUNK, rows - start), cols), dtype=np.float32) * np.float32(std)


def _dense_table(rng: np.random.Generator, rows: int, cols: int, gtype: GGMLType) -> np.ndarray:
    """A random V×d table in `gtype` (raw block bytes for the block types), built chunk by chunk."""
    encode = {GGMLType.F16: lambda x: x.astype(np.float16), GGMLType.F32: lambda x: x,
              GGMLType.Q8_0: lambda x: quantize(x, GGMLType.Q8_0), GGMLType.Q4_0: quantize_q4_0,
              GGMLType.IQ4_NL: quantize_iq4_nl}[gtype]
    return np.concatenate([encode(x) for x in _normal_rows(rng, rows, cols, 0.05)])


def write_nq(path: Path, shapes: dict = SMOLLM2_135M, embedding: TableKind = GGMLType.F16, seed: int = 0,
             bits: float = 1.0, source_name: str = "synthetic") -> Path:
    """The random `.nq` model: decoder linears one binary path each at `bits` per weight, the tables as `embedding`
    (an untied head is stored the same way)."""
    config = model_config(shapes)
    linears = [{lin: LinearPlan((rank_for_bits(*config.linear_shape(lin), bits),)) for lin in K.LINEARS}
               for _ in range(config.n_layers)]
    tables = {K.EMBD_TABLE: embedding} | ({} if config.tie_embeddings else {K.OUTPUT_TABLE: embedding})
    info = TokenizerInfo(byte_tokenizer_json(), chat_template=None, bos_id=None, eos_id=None, add_bos=False)
    prov = Provenance(converter_version="bench", preset="random", recipe="{}", bits_target=bits, bits_achieved=0.0,
                      source_name=source_name, source_sha256="0" * 64, source_params=config.parameter_count(),
                      calibration_sha256="none", date="2026-01-01T00:00:00Z")
    rng = np.random.default_rng(seed)
    with NQWriter(path, config, info, prov, linears, embedding_type=embedding) as w:
        shape_of: dict[str, tuple[int, ...]] = {}  # the current path's parts written so far (scale_out comes last)
        for spec in w.plan:
            part = spec.name.rsplit(".", 1)[-1]
            shape_of[part] = spec.shape
            if part in (K.V_SIGNS, K.U_SIGNS):
                cols = sign_columns(spec.name, config, linears, tables)
                a = np.concatenate([pack_signs(x) for x in _normal_rows(rng, spec.shape[0], cols, 1.0)])
            elif part == K.SCALE_OUT:  # keeps every product's output near unit size: 1/sqrt(n·r)
                n, r = shape_of[K.SCALE_IN][0], shape_of[K.V_SIGNS][0]
                a = (rng.uniform(0.5, 1.5, spec.shape) / np.sqrt(n * r)).astype(np.float16)
            elif spec.name in (K.TOKEN_EMBD, K.OUTPUT) or spec.name.endswith(".hot.weight"):
                a = _dense_table(rng, spec.shape[0], spec.shape[1], spec.gtype)
            elif part == "hot_ids":  # the first rows' tokens: any strictly increasing ids will do
                a = np.arange(spec.shape[0], dtype=np.uint32)
            else:  # norms, input/middle scales and biases
                a = rng.uniform(0.5, 1.5, spec.shape).astype(spec.numpy_dtype)
            w.write(spec.name, a)
    return path


def _gguf_tensors(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape (out, in), kind) of every tensor llama.cpp's llama/qwen2 graph reads, kind 'w' (F16) or
    'n' (F32 norm or bias)."""
    yield K.TOKEN_EMBD, (config.vocab, config.hidden), "w"
    for i in range(config.n_layers):
        yield f"blk.{i}.attn_norm.weight", (config.hidden,), "n"
        for lin in K.LINEARS:
            if lin == K.FFN_GATE:
                yield f"blk.{i}.ffn_norm.weight", (config.hidden,), "n"
            yield f"blk.{i}.{lin}.weight", config.linear_shape(lin), "w"
            if config.attention_bias and lin in K.BIASED_LINEARS:
                yield f"blk.{i}.{lin}.bias", (config.linear_shape(lin)[0],), "n"
    yield K.OUTPUT_NORM, (config.hidden,), "n"
    if not config.tie_embeddings:
        yield K.OUTPUT, (config.vocab, config.hidden), "w"


def gguf_vocab(vocab: int) -> list[str]:
    """llama.cpp's 'gpt2' (byte-level BPE) token list: the 256 byte tokens, one merged token, fillers to `vocab`."""
    tokens = list(_byte_vocab()) + ["Ġt"]
    return tokens + [f"<|synthetic_{i}|>" for i in range(len(tokens), vocab)]


def write_gguf_f16(path: Path, shapes: dict = QWEN25_1_5B, seed: int = 0) -> Path:
    """llama.cpp's GGUF of the same shapes, F16 random weights (norms and biases F32), a byte-level vocabulary;
    written one tensor at a time, so a multi-GB file never sits in memory."""
    import gguf

    config = model_config(shapes)
    arch = config.arch
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(f"synthetic {arch}")
    w.add_context_length(config.context_length)
    w.add_embedding_length(config.hidden)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
    w.add_token_list(gguf_vocab(config.vocab))
    w.add_token_types([gguf.TokenType.NORMAL] * config.vocab)
    w.add_token_merges(["Ġ t"])
    w.add_add_bos_token(False)
    plan = list(_gguf_tensors(config))
    for name, shape, kind in plan:
        dtype = np.float16 if kind == "w" else np.float32
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, kind in plan:
        if kind == "w":
            a = np.concatenate([x.astype(np.float16) for x in _normal_rows(rng, shape[0], shape[1], 0.02)])
        else:
            a = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        w.write_tensor_data(a)
    w.close()
    os.replace(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", choices=tuple(SHAPES), default="smollm2-135m")
    ap.add_argument("--embedding", default="f16", help="f16, q8_0, q4_0, iq4_nl, binary[:RANK[xPATHS]]")
    ap.add_argument("--gguf", action="store_true", help="write llama.cpp's F16 GGUF instead of a .nq file")
    args = ap.parse_args()
    shapes = SHAPES[args.model]
    if args.gguf:
        write_gguf_f16(args.out, shapes)
    else:
        try:
            kind = parse_table(args.embedding, shapes["hidden"])
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        write_nq(args.out, shapes, kind, source_name=f"synthetic {args.model} shapes")
    print(args.out, args.out.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
