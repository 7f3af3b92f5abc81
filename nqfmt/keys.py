"""Every metadata key and tensor name of the `.nq` format, in one place.

spec/FORMAT.md carries the same table; tests/nqfmt/test_spec.py keeps the two equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

FORMAT_VERSION = 1
ARCHITECTURE = "nanoquant"
ALIGNMENT = 64
GGUF_MAGIC = 0x46554747
GGUF_VERSION = 3



class ValueType(IntEnum):
    """GGUF metadata value types (the GGUF spec's numbering; equal to gguf.GGUFValueType, checked by a test).

    Defined here so that reading a file never imports the gguf package (~40 ms of every start-up)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class GGMLType(IntEnum):
    """The existing GGML tensor type ids this format uses (equal to gguf.GGMLQuantizationType's, checked by a test)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q8_0 = 8
    IQ4_NL = 20
    I32 = 26


# (elements per block, bytes per block) of each GGMLType
TYPE_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.Q4_0: (32, 18), GGMLType.Q8_0: (32, 34),
    GGMLType.IQ4_NL: (32, 18), GGMLType.I32: (1, 4),
}
VT = ValueType

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_SCALING_TYPES = ("none", "linear", "llama3")


@dataclass(frozen=True)
class KeySpec:
    """One metadata key: its GGUF value type (element type for arrays) and whether a reader may rely on it."""

    key: str
    vtype: VT
    required: bool
    array: bool = False


# general
ARCH = "general.architecture"
ALIGNMENT_KEY = "general.alignment"
NAME = "general.name"
# format
VERSION = "nanoquant.format_version"
BASE_ARCH = "nanoquant.base_architecture"
# hyperparameters
BLOCK_COUNT = "nanoquant.block_count"
EMBEDDING_LENGTH = "nanoquant.embedding_length"
FFN_LENGTH = "nanoquant.feed_forward_length"
HEAD_COUNT = "nanoquant.attention.head_count"
HEAD_COUNT_KV = "nanoquant.attention.head_count_kv"
HEAD_DIM = "nanoquant.attention.key_length"
VOCAB_SIZE = "nanoquant.vocab_size"
CONTEXT_LENGTH = "nanoquant.context_length"
NORM_EPS = "nanoquant.attention.layer_norm_rms_epsilon"
NORM_OFFSET = "nanoquant.norm_weight_offset"
ROPE_THETA = "nanoquant.rope.freq_base"
ROPE_THETA_LOCAL = "nanoquant.rope.freq_base_local"
ROPE_SCALING_TYPE = "nanoquant.rope.scaling.type"
ROPE_SCALING_FACTOR = "nanoquant.rope.scaling.factor"
ROPE_LOW_FREQ_FACTOR = "nanoquant.rope.scaling.low_freq_factor"
ROPE_HIGH_FREQ_FACTOR = "nanoquant.rope.scaling.high_freq_factor"
ROPE_ORIGINAL_CONTEXT = "nanoquant.rope.scaling.original_context_length"
TIED_EMBEDDINGS = "nanoquant.tie_word_embeddings"
ACTIVATION = "nanoquant.activation"
ATTENTION_BIAS = "nanoquant.attention.bias"
QK_NORM = "nanoquant.attention.qk_norm"
POST_NORMS = "nanoquant.post_norms"
SLIDING_WINDOW = "nanoquant.attention.sliding_window"
SLIDING_LAYERS = "nanoquant.attention.sliding_window_layers"
ATTENTION_SCALE = "nanoquant.attention.scale"
ATTN_SOFTCAP = "nanoquant.attention.logit_softcapping"
FINAL_SOFTCAP = "nanoquant.final_logit_softcapping"
EMBEDDING_SCALE = "nanoquant.embedding_scale"
# provenance
CONVERTER_VERSION = "nanoquant.converter.version"
PRESET = "nanoquant.recipe.preset"
RECIPE = "nanoquant.recipe.settings"
BITS_TARGET = "nanoquant.bits.target"
BITS_ACHIEVED = "nanoquant.bits.achieved"
SOURCE_NAME = "nanoquant.source.name"
SOURCE_SHA256 = "nanoquant.source.sha256"
SOURCE_PARAMS = "nanoquant.source.parameter_count"
CALIB_SHA256 = "nanoquant.calibration.sha256"
DATE = "nanoquant.date"
# tokenizer
TOKENIZER_JSON = "tokenizer.huggingface.json"
CHAT_TEMPLATE = "tokenizer.chat_template"
BOS_ID = "tokenizer.ggml.bos_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"
PAD_ID = "tokenizer.ggml.padding_token_id"
ADD_BOS = "tokenizer.ggml.add_bos_token"

_S, _U32, _U64, _F32, _B = VT.STRING, VT.UINT32, VT.UINT64, VT.FLOAT32, VT.BOOL

METADATA: dict[str, KeySpec] = {k.key: k for k in (
    KeySpec(ARCH, _S, True),
    KeySpec(ALIGNMENT_KEY, _U32, True),
    KeySpec(NAME, _S, False),
    KeySpec(VERSION, _U32, True),
    KeySpec(BASE_ARCH, _S, True),
    KeySpec(BLOCK_COUNT, _U32, True),
    KeySpec(EMBEDDING_LENGTH, _U32, True),
    KeySpec(FFN_LENGTH, _U32, True),
    KeySpec(HEAD_COUNT, _U32, True),
    KeySpec(HEAD_COUNT_KV, _U32, True),
    KeySpec(HEAD_DIM, _U32, True),
    KeySpec(VOCAB_SIZE, _U32, True),
    KeySpec(CONTEXT_LENGTH, _U32, True),
    KeySpec(NORM_EPS, _F32, True),
    KeySpec(NORM_OFFSET, _F32, True),
    KeySpec(ROPE_THETA, _F32, True),
    KeySpec(ROPE_THETA_LOCAL, _F32, True),
    KeySpec(ROPE_SCALING_TYPE, _S, True),
    KeySpec(ROPE_SCALING_FACTOR, _F32, True),
    KeySpec(ROPE_LOW_FREQ_FACTOR, _F32, True),
    KeySpec(ROPE_HIGH_FREQ_FACTOR, _F32, True),
    KeySpec(ROPE_ORIGINAL_CONTEXT, _U32, True),
    KeySpec(TIED_EMBEDDINGS, _B, True),
    KeySpec(ACTIVATION, _S, True),
    KeySpec(ATTENTION_BIAS, _B, True),
    KeySpec(QK_NORM, _B, True),
    KeySpec(POST_NORMS, _B, True),
    KeySpec(SLIDING_WINDOW, _U32, True),
    KeySpec(SLIDING_LAYERS, _B, True, array=True),
    KeySpec(ATTENTION_SCALE, _F32, True),
    KeySpec(ATTN_SOFTCAP, _F32, True),
    KeySpec(FINAL_SOFTCAP, _F32, True),
    KeySpec(EMBEDDING_SCALE, _F32, True),
    KeySpec(CONVERTER_VERSION, _S, True),
    KeySpec(PRESET, _S, True),
    KeySpec(RECIPE, _S, True),
    KeySpec(BITS_TARGET, _F32, True),
    KeySpec(BITS_ACHIEVED, _F32, True),
    KeySpec(SOURCE_NAME, _S, True),
    KeySpec(SOURCE_SHA256, _S, True),
    KeySpec(SOURCE_PARAMS, _U64, True),
    KeySpec(CALIB_SHA256, _S, True),
    KeySpec(DATE, _S, True),
    KeySpec(TOKENIZER_JSON, _S, True),
    KeySpec(CHAT_TEMPLATE, _S, False),
    KeySpec(BOS_ID, _U32, False),
    KeySpec(EOS_ID, _U32, False),
    KeySpec(PAD_ID, _U32, False),
    KeySpec(ADD_BOS, _B, True),
)}

# ModelConfig field -> metadata key (nqfmt/config.py)
METADATA_FIELDS_KEY: dict[str, str] = {
    "arch": BASE_ARCH, "n_layers": BLOCK_COUNT, "hidden": EMBEDDING_LENGTH, "n_heads": HEAD_COUNT,
    "n_kv_heads": HEAD_COUNT_KV, "head_dim": HEAD_DIM, "ffn": FFN_LENGTH, "vocab": VOCAB_SIZE,
    "context_length": CONTEXT_LENGTH, "norm_eps": NORM_EPS, "rope_theta": ROPE_THETA, "tie_embeddings": TIED_EMBEDDINGS,
    "activation": ACTIVATION, "attention_bias": ATTENTION_BIAS, "qk_norm": QK_NORM, "post_norms": POST_NORMS,
    "norm_offset": NORM_OFFSET, "rope_theta_local": ROPE_THETA_LOCAL, "rope_scaling_type": ROPE_SCALING_TYPE,
    "rope_scaling_factor": ROPE_SCALING_FACTOR, "rope_low_freq_factor": ROPE_LOW_FREQ_FACTOR,
    "rope_high_freq_factor": ROPE_HIGH_FREQ_FACTOR, "rope_original_context": ROPE_ORIGINAL_CONTEXT,
    "sliding_window": SLIDING_WINDOW, "sliding_layers": SLIDING_LAYERS, "attention_scale": ATTENTION_SCALE,
    "attn_softcap": ATTN_SOFTCAP, "final_softcap": FINAL_SOFTCAP, "embedding_scale": EMBEDDING_SCALE,
}

# tensor names (llama.cpp's, plus the binary-path parts)
TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
# the two tables' name prefixes: `token_embd.weight` (dense) or the paths `token_embd.pP.*` (binary-factored)
EMBD_TABLE, OUTPUT_TABLE = "token_embd", "output"
OUTPUT_NORM = "output_norm.weight"
CHECKSUMS = "nanoquant.checksums"

ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT = "attn_q", "attn_k", "attn_v", "attn_output"
FFN_GATE, FFN_UP, FFN_DOWN = "ffn_gate", "ffn_up", "ffn_down"
LINEARS = (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT, FFN_GATE, FFN_UP, FFN_DOWN)
BIASED_LINEARS = (ATTN_Q, ATTN_K, ATTN_V)

ATTN_NORM, FFN_NORM = "attn_norm", "ffn_norm"
ATTN_Q_NORM, ATTN_K_NORM = "attn_q_norm", "attn_k_norm"
ATTN_POST_NORM, FFN_POST_NORM = "attn_post_norm", "ffn_post_norm"

V_SIGNS, U_SIGNS = "v_signs", "u_signs"
SCALE_IN, SCALE_OUT, SCALE_MID = "scale_in", "scale_out", "scale_mid"
PATH_PARTS = (V_SIGNS, U_SIGNS, SCALE_IN, SCALE_OUT, SCALE_MID)
MAX_PATHS = 8

# GGML types this format uses (all existing ids; packed signs are I32 words read as uint32)
SIGN_TYPE = GGMLType.I32
SCALE_TYPE = GGMLType.F16
NORM_TYPE = GGMLType.F32
BIAS_TYPE = GGMLType.F32
EMBEDDING_TYPES = (GGMLType.F16, GGMLType.F32, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.IQ4_NL)
Q4_TYPES = (GGMLType.Q4_0, GGMLType.IQ4_NL)  # 4-bit blocks of 32 (nqfmt/q4.py)
BLOCK_TYPES = (GGMLType.Q8_0, *Q4_TYPES)  # rows must be whole blocks of 32


def norm_tensor(layer: int, norm: str) -> str:
    return f"blk.{layer}.{norm}.weight"


def bias_tensor(layer: int, linear: str) -> str:
    return f"blk.{layer}.{linear}.bias"


def path_tensor(layer: int, linear: str, path: int, part: str) -> str:
    """Name of one part of binary path `path` of a factored linear, e.g. `blk.3.ffn_up.p0.v_signs`."""
    return f"blk.{layer}.{linear}.p{path}.{part}"


def table_path_tensor(table: str, path: int, part: str) -> str:
    """Name of one part of a binary-factored embedding or head (`table` is EMBD_TABLE or OUTPUT_TABLE), e.g.
    `token_embd.p0.u_signs`."""
    return f"{table}.p{path}.{part}"


def dense_table_tensor(table: str) -> str:
    """`token_embd.weight` / `output.weight`: the name of a dense table (of a hot-row table: its other rows)."""
    return f"{table}.weight"


HOT_ROWS_TYPE = GGMLType.Q8_0  # the frequent rows of a hot-row table (spec §3.4)


def hot_rows_tensor(table: str) -> str:
    """`token_embd.hot.weight`: a hot-row table's frequent rows, in the order of its ids."""
    return f"{table}.hot.weight"


def hot_ids_tensor(table: str) -> str:
    """`token_embd.hot_ids`: the token ids of a hot-row table's frequent rows, strictly increasing."""
    return f"{table}.hot_ids"
