"""`ModelConfig`: a decoder's hyperparameters, shared by the converter (writes them) and the runtime (builds from them)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

from . import keys as K
from .errors import NQFormatError


# Ranges of the float hyperparameters, wide around every model the format targets: RoPE bases below 1 make the
# inverse frequencies overflow, attention scales above 1 and norm epsilons above 1 no model uses.
_RANGES = {"rope_theta": (1.0, 1e12), "rope_theta_local": (1.0, 1e12), "attention_scale": (0.0, 1.0),
           "norm_eps": (0.0, 1.0), "embedding_scale": (0.0, 1e5), "rope_scaling_factor": (0.0, 1e4),
           "attn_softcap": (0.0, math.inf), "final_softcap": (0.0, math.inf), "norm_offset": (-1e3, 1e3)}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs besides the weights.

    Conventions (see spec/FORMAT.md): Q/K are stored in Hugging Face's layout (rotate-half RoPE); norm weights are
    applied as `x * (norm_offset + w)` (Gemma stores w - 1, so its offset is 1.0); `sliding_layers[i]` says whether
    layer i attends through a window of `sliding_window` tokens and uses `rope_theta_local`.
    """

    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context_length: int
    norm_eps: float
    rope_theta: float
    tie_embeddings: bool
    activation: str = "silu"
    attention_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    norm_offset: float = 0.0
    rope_theta_local: float = 0.0
    rope_scaling_type: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 1.0
    rope_original_context: int = 0
    sliding_window: int = 0
    sliding_layers: tuple[bool, ...] = field(default=())
    attention_scale: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    embedding_scale: float = 1.0

    def __post_init__(self) -> None:
        self._check_sizes()  # before anything is sized by them (sliding_layers below)
        if not self.sliding_layers:
            object.__setattr__(self, "sliding_layers", (False,) * self.n_layers)
        if self.rope_theta_local == 0.0:
            object.__setattr__(self, "rope_theta_local", self.rope_theta)
        if self.attention_scale == 0.0 and self.head_dim > 0:
            object.__setattr__(self, "attention_scale", 1.0 / math.sqrt(self.head_dim))
        object.__setattr__(self, "sliding_layers", tuple(bool(b) for b in self.sliding_layers))
        for f in fields(self):  # the file stores float32: keep the in-memory config identical to a read-back one
            if f.type == "float":
                object.__setattr__(self, f.name, float(np.float32(getattr(self, f.name))))
        self.validate()

    def _check_sizes(self) -> None:
        for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "context_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**31:
                raise NQFormatError(f"model config: {name} = {v!r} must be a positive integer below 2^31")

    def validate(self) -> None:
        """Reject hyperparameters no forward pass could run, naming the field: sizes, and the ranges of
        _RANGES (values outside them make a forward pass divide by zero or overflow float32)."""
        def bad(what: str) -> NQFormatError:
            return NQFormatError(f"model config: {what}")

        if self.arch not in K.ARCHITECTURES:
            raise bad(f"architecture {self.arch!r} is not supported (supported: {', '.join(K.ARCHITECTURES)})")
        self._check_sizes()
        if self.n_heads % self.n_kv_heads:
            raise bad(f"head_count {self.n_heads} is not a multiple of head_count_kv {self.n_kv_heads}")
        if self.head_dim % 2:
            raise bad(f"head_dim {self.head_dim} must be even for RoPE")
        if self.activation not in K.ACTIVATIONS:
            raise bad(f"activation {self.activation!r} is not one of {K.ACTIVATIONS}")
        if self.rope_scaling_type not in K.ROPE_SCALING_TYPES:
            raise bad(f"rope scaling {self.rope_scaling_type!r} is not one of {K.ROPE_SCALING_TYPES}")
        if len(self.sliding_layers) != self.n_layers:
            raise bad(f"sliding_window_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")
        if any(self.sliding_layers) and self.sliding_window <= 0:
            raise bad("sliding-window layers are marked but sliding_window is 0")
        for name in ("norm_eps", "rope_theta", "rope_theta_local", "rope_scaling_factor", "attention_scale",
                     "embedding_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise bad(f"{name} = {v!r} must be a finite positive number")
        for name in ("norm_offset", "attn_softcap", "final_softcap", "rope_low_freq_factor", "rope_high_freq_factor"):
            if not math.isfinite(getattr(self, name)):
                raise bad(f"{name} must be finite")
        for name, (low, high) in _RANGES.items():
            v = getattr(self, name)
            if not low <= v <= high:
                raise bad(f"{name} = {v!r} is outside {low:g}..{high:g}")
        if self.rope_scaling_type == "llama3" and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor and self.rope_original_context > 0):
            raise bad(f"llama3 RoPE scaling needs 0 < rope_low_freq_factor ({self.rope_low_freq_factor!r}) < "
                      f"rope_high_freq_factor ({self.rope_high_freq_factor!r}) and rope_original_context "
                      f"({self.rope_original_context!r}) > 0")

    # --- shapes -------------------------------------------------------------------------------------------------
    def linear_shape(self, linear: str) -> tuple[int, int]:
        """(m out, n in) of one decoder linear, as Hugging Face stores its weight."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {
            K.ATTN_Q: (q, self.hidden), K.ATTN_K: (kv, self.hidden), K.ATTN_V: (kv, self.hidden),
            K.ATTN_OUT: (self.hidden, q), K.FFN_GATE: (self.ffn, self.hidden), K.FFN_UP: (self.ffn, self.hidden),
            K.FFN_DOWN: (self.hidden, self.ffn),
        }[linear]

    def block_norms(self) -> tuple[str, ...]:
        """The norm tensors every block holds, in file order."""
        norms = [K.ATTN_NORM, K.FFN_NORM]
        if self.qk_norm:
            norms += [K.ATTN_Q_NORM, K.ATTN_K_NORM]
        if self.post_norms:
            norms += [K.ATTN_POST_NORM, K.FFN_POST_NORM]
        return tuple(norms)

    def norm_length(self, norm: str) -> int:
        return self.head_dim if norm in (K.ATTN_Q_NORM, K.ATTN_K_NORM) else self.hidden

    def parameter_count(self) -> int:
        """Parameters of the full-precision source model (the denominator of whole-file bits per weight)."""
        per_block = sum(m * n for m, n in map(self.linear_shape, K.LINEARS))
        per_block += sum(self.norm_length(nm) for nm in self.block_norms())
        if self.attention_bias:
            per_block += sum(self.linear_shape(lin)[0] for lin in K.BIASED_LINEARS)
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.n_layers * per_block + self.vocab * self.hidden + head + self.hidden

    # --- metadata -----------------------------------------------------------------------------------------------
    def to_metadata(self) -> dict[str, object]:
        """The config as `{key: value}` under the `nanoquant.*` keys of keys.py."""
        return {K.METADATA_FIELDS_KEY[f.name]: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_metadata(cls, meta: dict[str, object]) -> "ModelConfig":
        """Build from parsed metadata; a missing or mistyped key raises NQFormatError naming it."""
        kwargs = {}
        for f in fields(cls):
            key = K.METADATA_FIELDS_KEY[f.name]
            if key not in meta:
                raise NQFormatError(f"metadata key {key!r} is missing")
            v = meta[key]
            kwargs[f.name] = tuple(v) if f.name == "sliding_layers" else v
        if len(kwargs["sliding_layers"]) != kwargs["n_layers"]:  # checked here: an empty list would mean all False
            raise NQFormatError(f"model config: sliding_window_layers has {len(kwargs['sliding_layers'])} entries "
                                f"for {kwargs['n_layers']!r} layers")
        return cls(**kwargs)
