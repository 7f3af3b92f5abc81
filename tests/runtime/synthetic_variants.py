"""Tiny random `.nq` files for every architecture variant the runtime supports."""
from __future__ import annotations

from nqfmt.keys import GGMLType

import numpy as np

from nqfmt import HotRows, LinearPlan, NQWriter, TokenizerInfo
from nqfmt import keys as K
from bench.synthetic_model import byte_tokenizer_json
from synthetic import TINY_TOKENIZER, provenance, random_tensors, tiny_config

# name -> (config overrides, ranks per path, scale_mid, embedding kind: a GGML type, hot rows or a binary-factored plan)
VARIANTS = {
    "llama": (dict(arch="llama"), (40,), False, GGMLType.F16),
    "llama-2path-mid": (dict(arch="llama"), (40, 24), True, GGMLType.F16),
    # head sizes the fused step's attention sums in registers on AVX-512 (numba_decode.weighted_sum)
    "llama-head64": (dict(arch="llama", n_heads=2, n_kv_heads=1, head_dim=64), (40,), False, GGMLType.F16),
    "qwen2-head128": (dict(arch="qwen2", n_heads=2, n_kv_heads=1, head_dim=128), (40,), False, GGMLType.F16),
    "llama3-rope-q8": (dict(arch="llama", rope_scaling_type="llama3", rope_scaling_factor=8.0,
                            rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_context=32,
                            tie_embeddings=False, hidden=96), (40,), False, GGMLType.Q8_0),
    "mistral-sliding": (dict(arch="mistral", sliding_window=7, sliding_layers=(True, True)), (40,), False, GGMLType.F16),
    "qwen2": (dict(arch="qwen2"), (40,), False, GGMLType.F16),
    "qwen3": (dict(arch="qwen3"), (40,), True, GGMLType.F16),
    "gemma3": (dict(arch="gemma3"), (40,), False, GGMLType.F16),
    "gemma3-softcap-linear": (dict(arch="gemma3", final_softcap=9.0, rope_scaling_type="linear",
                                   rope_scaling_factor=4.0), (40,), True, GGMLType.F32),
    "gemma3-attn-softcap": (dict(arch="gemma3", attn_softcap=5.0), (40,), False, GGMLType.F16),
    "llama-q4": (dict(arch="llama", hidden=96), (40,), False, GGMLType.Q4_0),
    "qwen2-q4": (dict(arch="qwen2", hidden=96), (40,), False, GGMLType.Q4_0),
    "gemma3-iq4": (dict(arch="gemma3", hidden=96, embedding_scale=96 ** 0.5), (40,), False, GGMLType.IQ4_NL),
    "qwen2-iq4-hot": (dict(arch="qwen2", hidden=96), (40,), False, HotRows(GGMLType.IQ4_NL, 13)),
    "llama-binary-table": (dict(arch="llama"), (40,), False, LinearPlan((40, 9), True)),
    "qwen2-binary-table": (dict(arch="qwen2"), (40,), False, LinearPlan((33,))),
}
# transformers' Gemma 3 stores attn_logit_softcapping but never applies it (Gemma 2 did): that variant is checked
# between our backends only.
HF_VARIANTS = tuple(v for v in VARIANTS if v != "gemma3-attn-softcap")


SPECIAL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_text_model(path, variant: str = "llama", seed: int = 0, add_bos: bool = False):
    """A variant whose tokenizer has one token per byte plus ChatML's special tokens (ids 256-258, <|im_end|> the
    EOS), over a 259-token vocabulary, so generated ids are text."""
    return write_variant(path, variant, seed, vocab=259,
                         tokenizer=TokenizerInfo(byte_tokenizer_json(SPECIAL), CHATML, bos_id=256, eos_id=257,
                                                 add_bos=add_bos))


def write_variant(path, variant: str, seed: int = 0, vocab: int | None = None, tokenizer: TokenizerInfo | None = None):
    """Write one variant with synthetic.py's random tensors, each scale_out divided by sqrt(rank·n) so every
    linear keeps activations at unit size, as trained weights do (raw ±1 products grow attention scores into
    near-ties whose float32 rounding flips a softmax, which says nothing about the kernels)."""
    over, ranks, mid, emb = VARIANTS[variant]
    over = dict(over, **({"vocab": vocab} if vocab else {}))
    config = tiny_config(over.pop("arch"), **over)
    linears = [{lin: LinearPlan(tuple(min(r, *config.linear_shape(lin)) for r in ranks), mid) for lin in K.LINEARS}
               for _ in range(config.n_layers)]
    tok = tokenizer or TokenizerInfo(TINY_TOKENIZER, "{{ messages }}", bos_id=0, eos_id=1, add_bos=False)
    with NQWriter(path, config, tok, provenance(), linears, embedding_type=emb) as w:
        tensors = random_tensors(w, seed)
        for spec in w.plan:
            a = tensors[spec.name]
            if spec.name.endswith(K.SCALE_OUT):
                *owner, p, _ = spec.name.split(".")
                if len(owner) == 1:  # a binary-factored table: V out × d in
                    rank, n = w.tables[owner[0]].ranks[int(p[1:])], config.hidden
                else:
                    plan, n = linears[int(owner[1])][owner[2]], config.linear_shape(owner[2])[1]
                    rank = plan.ranks[int(p[1:])]
                a = (a.astype(np.float32) / np.sqrt(rank * n)).astype(np.float16)
            w.write(spec.name, a)
    return path
