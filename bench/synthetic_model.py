"""A random-weight `.nq` file with SmolLM2-135M's real shapes, for speed work before a converted model exists.

Speed does not depend on the values: 30 layers, hidden 576, 9 heads / 3 kv heads of 64, ffn 1536, vocab 49152,
tied embeddings, ranks at a 1.0 bpw target (q/o 256, k/v 128, gate/up/down 384).
Usage: python -m bench.synthetic_model OUT.nq [--embedding f16|q8_0]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from nqfmt.keys import GGMLType
from gguf.quants import quantize

from nqfmt import LinearPlan, ModelConfig, NQWriter, Provenance, TokenizerInfo, pack_signs, rank_for_bits
from nqfmt import keys as K

SMOLLM2_135M = dict(arch="llama", n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536,
                    vocab=49152, context_length=8192, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True)

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


TINY = dict(SMOLLM2_135M, n_layers=1, hidden=64, n_heads=2, n_kv_heads=1, head_dim=32, ffn=96, vocab=512,
            context_length=256)


def write_smollm2_shaped(path: Path, embedding: GGMLType = GGMLType.F16, seed: int = 0, bits: float = 1.0,
                         shapes: dict = SMOLLM2_135M) -> Path:
    """The random model (`shapes`: SMOLLM2_135M, or TINY to warm kernels up cheaply)."""
    config = ModelConfig(**shapes)
    linears = [{lin: LinearPlan((rank_for_bits(*config.linear_shape(lin), bits),)) for lin in K.LINEARS}
               for _ in range(config.n_layers)]
    info = TokenizerInfo(byte_tokenizer_json(), chat_template=None, bos_id=None, eos_id=None, add_bos=False)
    prov = Provenance(converter_version="bench", preset="random", recipe="{}", bits_target=bits, bits_achieved=0.0,
                      source_name="synthetic SmolLM2-135M shapes", source_sha256="0" * 64,
                      source_params=config.parameter_count(), calibration_sha256="none",
                      date="2026-01-01T00:00:00Z")
    rng = np.random.default_rng(seed)
    with NQWriter(path, config, info, prov, linears, embedding_type=embedding) as w:
        for spec in w.plan:
            part = spec.name.rsplit(".", 1)[-1]
            if part in (K.V_SIGNS, K.U_SIGNS):
                _, layer, linear, p, _ = spec.name.split(".")
                r = linears[int(layer)][linear].ranks[0]
                cols = config.linear_shape(linear)[1] if part == K.V_SIGNS else r
                a = pack_signs(rng.standard_normal((spec.shape[0], cols)))
            elif part == K.SCALE_OUT:
                _, layer, linear, _, _ = spec.name.split(".")
                n, r = config.linear_shape(linear)[1], linears[int(layer)][linear].ranks[0]
                a = (rng.uniform(0.5, 1.5, spec.shape) / np.sqrt(n * r)).astype(np.float16)
            elif spec.gtype == GGMLType.Q8_0:
                a = quantize((rng.standard_normal(spec.shape) * 0.05).astype(np.float32), GGMLType.Q8_0)
            elif spec.name == K.TOKEN_EMBD:
                a = (rng.standard_normal(spec.shape) * 0.05).astype(np.float16)
            else:
                a = rng.uniform(0.5, 1.5, spec.shape).astype(spec.numpy_dtype)
            w.write(spec.name, a)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--embedding", choices=("f16", "q8_0"), default="f16")
    args = ap.parse_args()
    write_smollm2_shaped(args.out, GGMLType.F16 if args.embedding == "f16" else GGMLType.Q8_0)
    print(args.out, args.out.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
