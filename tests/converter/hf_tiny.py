"""Tiny random Hugging Face checkpoints (2 layers, sizes not multiples of 32) saved with transformers, for tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from synthetic import TINY_TOKENIZER

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 91, 72, 3, 1, 24, 100
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
               head_dim=HEAD_DIM, intermediate_size=FFN, num_hidden_layers=2, max_position_embeddings=64,
               rms_norm_eps=1e-6)

# arch -> (model class, config class, config overrides)
ARCHS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              dict(tie_word_embeddings=True, rope_theta=5000.0,
                   rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=16))),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(tie_word_embeddings=False, sliding_window=5)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(tie_word_embeddings=True)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=20,
                    rope_theta=1e6, rope_local_base_freq=10_000.0, hidden_activation="gelu_pytorch_tanh")),
}


def build(arch: str, seed: int = 0, **sizes):
    """A random-initialised transformers model of `arch`, every parameter random (biases and norms included);
    `sizes` overrides config fields (e.g. hidden_size)."""
    model_cls, config_cls, over = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**_COMMON, **over, **sizes})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if arch == "gemma3" else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model


def save(arch: str, directory: Path, seed: int = 0, shard_size: str | None = None, **sizes):
    """Build and save_pretrained a tiny model (in shards of `shard_size` if given) plus a small tokenizer.json and
    tokenizer_config.json."""
    model = build(arch, seed, **sizes)
    model.save_pretrained(directory, **({"max_shard_size": shard_size} if shard_size else {}))
    (directory / "tokenizer.json").write_text(TINY_TOKENIZER)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "eos_token": "b"}))
    return model


def save_gemma3_multimodal(directory: Path, seed: int = 0):
    """A tiny Gemma 3 image-text checkpoint (its config.json nests the text model's in text_config, leaving
    defaults out); returns the transformers model, whose text-only forward is what we convert."""
    text = getattr(transformers, ARCHS["gemma3"][1])(**_COMMON, **ARCHS["gemma3"][2])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(-0.5, 0.5) if "norm" in name else p.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(TINY_TOKENIZER)
    return model
