"""Tiny random `.nq` files for tests: odd sizes, every tensor kind, written through the real writer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nqfmt.keys import GGMLType

from nqfmt import LinearPlan, ModelConfig, NQWriter, Provenance, TokenizerInfo, pack_signs
from nqfmt import keys as K
from nqfmt.layout import sign_columns
from nqfmt.q4 import quantize_iq4_nl, quantize_q4_0

TINY_TOKENIZER = json.dumps({
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                        "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": {"a": 0, "b": 1}, "merges": []},
})


def tiny_config(arch: str = "llama", **over) -> ModelConfig:
    """A 2-layer model with sizes that are not multiples of 32."""
    base = dict(arch=arch, n_layers=2, hidden=72, n_heads=3, n_kv_heads=1, head_dim=24, ffn=100, vocab=91,
                context_length=128, norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=True)
    if arch == "qwen2":
        base.update(attention_bias=True, tie_embeddings=False)
    if arch == "qwen3":
        base.update(qk_norm=True)
    if arch == "gemma3":
        base.update(qk_norm=True, post_norms=True, norm_offset=1.0, activation="gelu_tanh", sliding_window=16,
                    sliding_layers=(True, False), rope_theta_local=10000.0, rope_theta=1e6, embedding_scale=72 ** 0.5,
                    attention_scale=0.2)
    base.update(over)
    return ModelConfig(**base)


def provenance(**over) -> Provenance:
    base = dict(converter_version="test", preset="test", recipe="{}", bits_target=1.0, bits_achieved=0.9,
                source_name="synthetic", source_sha256="0" * 64, source_params=1000, calibration_sha256="none",
                date="2026-01-01T00:00:00Z")
    base.update(over)
    return Provenance(**base)


def random_tensors(writer: NQWriter, seed: int = 0) -> dict[str, np.ndarray]:
    """A random array for every tensor of the writer's plan (never zeros)."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in writer.plan:
        if spec.name.endswith(".hot_ids"):  # strictly increasing token ids (spec §3.4)
            out[spec.name] = np.sort(rng.choice(writer.config.vocab, spec.shape[0], replace=False)).astype(np.uint32)
        elif spec.gtype == K.SIGN_TYPE:
            n = sign_columns(spec.name, writer.config, writer.linears, writer.tables)
            out[spec.name] = pack_signs(rng.standard_normal((spec.shape[0], n)))
        elif spec.gtype == GGMLType.Q8_0:
            from gguf.quants import quantize
            out[spec.name] = quantize(rng.standard_normal(spec.shape).astype(np.float32), GGMLType.Q8_0)
        elif spec.gtype in (GGMLType.Q4_0, GGMLType.IQ4_NL):
            quantizer = quantize_q4_0 if spec.gtype == GGMLType.Q4_0 else quantize_iq4_nl
            out[spec.name] = quantizer(rng.standard_normal(spec.shape))
        else:
            out[spec.name] = (rng.uniform(0.5, 1.5, spec.shape) * rng.choice([-1, 1], spec.shape)).astype(
                spec.numpy_dtype)
    return out


def write_random(path: Path, config: ModelConfig | None = None, ranks=(32,), has_mid: bool = False, seed: int = 0,
                 embedding_type=GGMLType.F16, chat_template: str | None = "{{ messages }}",
                 output_type=None) -> dict[str, np.ndarray]:
    """Write a random file; returns what was written, tensor by tensor. `embedding_type` / `output_type`: a GGML type
    or the LinearPlan of a binary-factored table (spec/FORMAT.md §3.4)."""
    config = config or tiny_config()
    linears = [{lin: LinearPlan(tuple(min(r, *config.linear_shape(lin)) for r in ranks), has_mid)
                for lin in K.LINEARS} for _ in range(config.n_layers)]
    tok = TokenizerInfo(TINY_TOKENIZER, chat_template, bos_id=0, eos_id=1, add_bos=False)
    prov = provenance(source_params=config.parameter_count())
    with NQWriter(path, config, tok, prov, linears, embedding_type=embedding_type, output_type=output_type) as w:
        tensors = random_tensors(w, seed)
        for spec in w.plan:
            w.write(spec.name, tensors[spec.name])
    return tensors
