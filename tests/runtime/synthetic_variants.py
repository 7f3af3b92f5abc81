"""Tiny random `.nq` files for every architecture variant the runtime supports."""
from __future__ import annotations

from gguf import GGMLQuantizationType as GT

from synthetic import tiny_config, write_random

# name -> (config overrides, ranks per path, scale_mid, embedding type)
VARIANTS = {
    "llama": (dict(arch="llama"), (40,), False, GT.F16),
    "llama-2path-mid": (dict(arch="llama"), (40, 24), True, GT.F16),
    "llama3-rope-q8": (dict(arch="llama", rope_scaling_type="llama3", rope_scaling_factor=8.0,
                            rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_context=32,
                            tie_embeddings=False, hidden=96), (40,), False, GT.Q8_0),
    "mistral-sliding": (dict(arch="mistral", sliding_window=7, sliding_layers=(True, True)), (40,), False, GT.F16),
    "qwen2": (dict(arch="qwen2"), (40,), False, GT.F16),
    "qwen3": (dict(arch="qwen3"), (40,), True, GT.F16),
    "gemma3": (dict(arch="gemma3"), (40,), False, GT.F16),
    "gemma3-softcap-linear": (dict(arch="gemma3", final_softcap=9.0, rope_scaling_type="linear",
                                   rope_scaling_factor=4.0), (40,), True, GT.F32),
    "gemma3-attn-softcap": (dict(arch="gemma3", attn_softcap=5.0), (40,), False, GT.F16),
}
# transformers' Gemma 3 stores attn_logit_softcapping but never applies it (Gemma 2 did): that variant is checked
# between our backends only.
HF_VARIANTS = tuple(v for v in VARIANTS if v != "gemma3-attn-softcap")


def write_variant(path, variant: str, seed: int = 0):
    over, ranks, mid, emb = VARIANTS[variant]
    over = dict(over)
    arch = over.pop("arch")
    write_random(path, tiny_config(arch, **over), ranks=ranks, has_mid=mid, embedding_type=emb, seed=seed)
    return path

