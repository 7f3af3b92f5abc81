"""The torch reference forward pass for every supported architecture, in Hugging Face's weight layout.

One decoder covers Llama/SmolLM/Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Gemma 3 text (post norms,
(1+w) norms, GeGLU, sliding-window layers with their own RoPE base, scaled embeddings): the differences are all fields
of `nqfmt.ModelConfig`. The conversion pipeline builds one `DecoderBlock` at a time and swaps its `nn.Linear`s for
`BinaryFactoredLinear`s; `load_nq` rebuilds a whole model from a `.nq` file so its logits can be compared with the
standalone runtime's.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from nqfmt.keys import GGMLType
from nqfmt.q4 import dequantize_q4
from nqfmt.q8_0 import dequantize_q8_0
from torch import nn
from torch.nn import functional as F

from nqfmt import HotRows, ModelConfig, open_nq, unpack_signs
from nqfmt import keys as K
from nqfmt.layout import cold_ids

from .factored import BinaryFactoredLinear, TrainablePath


def inv_freq(config: ModelConfig, layer: int) -> torch.Tensor:
    """RoPE inverse frequencies of one layer (head_dim/2), with llama3 or linear scaling as configured."""
    theta = config.rope_theta_local if config.sliding_layers[layer] else config.rope_theta
    dim = config.head_dim
    freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    if config.sliding_layers[layer] and config.arch == "gemma3":
        return freq  # Gemma 3 scales only its global layers' RoPE
    if config.rope_scaling_type == "linear":
        return freq / config.rope_scaling_factor
    if config.rope_scaling_type == "llama3":
        factor, old = config.rope_scaling_factor, config.rope_original_context
        low_wavelen = old / config.rope_low_freq_factor
        high_wavelen = old / config.rope_high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > low_wavelen, freq / factor, freq)
        smooth = (old / wavelen - config.rope_low_freq_factor) / (config.rope_high_freq_factor
                                                                  - config.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return freq


def rope(config: ModelConfig, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [T, head_dim], for the rotate-half convention (first half paired with second half)."""
    angles = positions.to(torch.float32)[:, None] * inv_freq(config, layer)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, head_dim] by the angles of (cos, sin) [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_mask(config: ModelConfig, layer: int, length: int) -> torch.Tensor:
    """[T, T] boolean, True where query i may attend key j: causal, and within the window on sliding layers."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = j <= i
    if config.sliding_layers[layer]:
        allowed &= (i - j) < config.sliding_window
    return allowed


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + w); Gemma stores w - 1 and uses offset 1.0, the others offset 0.0."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(_f32(weight), requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (self.offset + self.weight)


def _f32(t) -> torch.Tensor:
    return torch.as_tensor(t).detach().to(torch.float32)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen full-precision nn.Linear holding exactly the given weight (and bias)."""
    m, n = weight.shape
    lin = nn.Linear(n, m, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(_f32(weight), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(_f32(bias), requires_grad=False)
    return lin


class DecoderBlock(nn.Module):
    """One pre-norm transformer block: attention (GQA, RoPE, causal, optional window, q/k norms, post norm) and a
    gated MLP (SwiGLU or GeGLU, optional post norm), each added to the residual stream.

    `weights` uses the keys of `Source.block_weights` (`attn_q.weight`, `attn_q.bias`, `attn_norm.weight`, ...).
    `linears` may supply ready modules (e.g. BinaryFactoredLinear) instead of the `*.weight` entries. Full-precision
    weights start with requires_grad off (computing teacher outputs needs no weight gradients); a stage that tunes
    them switches it on.
    """

    def __init__(self, config: ModelConfig, layer: int, weights: dict[str, torch.Tensor],
                 linears: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.config, self.layer = config, layer
        given = linears or {}
        self.linears = nn.ModuleDict({
            name: given[name] if name in given else _linear(weights[f"{name}.weight"], weights.get(f"{name}.bias"))
            for name in K.LINEARS})
        self.norms = nn.ModuleDict({name: RMSNorm(weights[f"{name}.weight"], config.norm_eps, config.norm_offset)
                                    for name in config.block_norms()})
        self._cache: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _positional(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin, mask) for positions 0..T-1, kept for the last T seen (blocks run many batches of one length)."""
        if self._cache is None or self._cache[0] != length or self._cache[1].device != device:
            cos, sin = rope(self.config, self.layer, torch.arange(length))
            mask = attention_mask(self.config, self.layer, length)
            self._cache = (length, cos.to(device), sin.to(device), mask.to(device))
        return self._cache[1:]

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        q = self.linears[K.ATTN_Q](x).view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.linears[K.ATTN_K](x).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.linears[K.ATTN_V](x).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        if c.qk_norm:
            q, k = self.norms[K.ATTN_Q_NORM](q), self.norms[K.ATTN_K_NORM](k)
        cos, sin, mask = self._positional(t, x.device)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if c.attn_softcap:
            groups = c.n_heads // c.n_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            scores = (q @ k.transpose(-1, -2)) * c.attention_scale
            scores = torch.tanh(scores / c.attn_softcap) * c.attn_softcap
            scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores, dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c.attention_scale,
                                                 enable_gqa=c.n_heads != c.n_kv_heads)
        return self.linears[K.ATTN_OUT](out.transpose(1, 2).reshape(b, t, c.n_heads * c.head_dim))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.linears[K.FFN_GATE](x)
        act = F.silu(gate) if self.config.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.linears[K.FFN_DOWN](act * self.linears[K.FFN_UP](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention(self.norms[K.ATTN_NORM](x))
        if self.config.post_norms:
            a = self.norms[K.ATTN_POST_NORM](a)
        x = x + a
        f = self.mlp(self.norms[K.FFN_NORM](x))
        if self.config.post_norms:
            f = self.norms[K.FFN_POST_NORM](f)
        return x + f


# A V×d table (spec/FORMAT.md §3.4): fixed values, or a module with `rows(ids)`, `forward(x)` (the head's product)
# and `scales()` that distillation tunes (a binary-factored BinaryFactoredLinear)
Table = torch.Tensor | nn.Module


def _table(t: Table) -> nn.Parameter | nn.Module:
    return t if isinstance(t, nn.Module) else nn.Parameter(_f32(t), requires_grad=False)


class TorchModel(nn.Module):
    """Embedding, decoder blocks, final norm and head (tied to the embedding unless `output` is given). Each table is
    a tensor or a module (`Table`) whose rows are the embedding and whose product is the head's logits."""

    def __init__(self, config: ModelConfig, token_embd: Table, blocks: list[DecoderBlock],
                 output_norm: torch.Tensor, output: Table | None = None) -> None:
        super().__init__()
        if (output is None) != config.tie_embeddings:
            raise ValueError("an output head is needed exactly when the embeddings are untied")
        self.config = config
        self.token_embd = _table(token_embd)
        self.blocks = nn.ModuleList(blocks)
        self.output_norm = RMSNorm(output_norm, config.norm_eps, config.norm_offset)
        self.output = None if output is None else _table(output)

    @classmethod
    def from_source(cls, source) -> "TorchModel":
        """The whole full-precision model of a `converter.sources.Source` (small models, tests, evaluation)."""
        c = source.config
        blocks = [DecoderBlock(c, i, source.block_weights(i)) for i in range(c.n_layers)]
        output = None if c.tie_embeddings else source.tensor(K.OUTPUT)
        return cls(c, source.tensor(K.TOKEN_EMBD), blocks, source.tensor(K.OUTPUT_NORM), output)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.token_embd
        h = t.rows(tokens) if isinstance(t, nn.Module) else F.embedding(tokens, t)
        return h * self.config.embedding_scale if self.config.embedding_scale != 1.0 else h

    def scaled_tables(self) -> list[nn.Module]:
        """The embedding / head modules with tunable scales, each once (a tied table serves both)."""
        return [t for t in (self.token_embd, self.output) if isinstance(t, nn.Module)]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        table = self.token_embd if self.output is None else self.output
        x = self.output_norm(h)
        logits = table(x) if isinstance(table, nn.Module) else F.linear(x, table)
        if self.config.final_softcap:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position of `tokens` [B, T]."""
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _table_of(nq, table: str) -> Table:
    """The embedding (K.EMBD_TABLE) or untied head (K.OUTPUT_TABLE) of the file as the converter's model holds it:
    dense values as float32 (F16 widened, Q8_0, Q4_0 and IQ4_NL dequantized by nqfmt's references, hot rows put in
    their tokens' places) or a frozen BinaryFactoredLinear."""
    kind = nq.tables[table]
    if isinstance(kind, HotRows):
        cold, ids, hot = nq.hot_table(table)
        values = torch.empty(nq.config.vocab, nq.config.hidden)
        values[torch.from_numpy(cold_ids(ids, nq.config.vocab))] = torch.from_numpy(dequantize_q4(cold, kind.gtype))
        values[torch.from_numpy(ids)] = torch.from_numpy(dequantize_q8_0(hot))
        return values
    if not isinstance(kind, GGMLType):
        return _factored(nq.factored_table(table))
    raw = nq.array(K.dense_table_tensor(table))
    if kind == GGMLType.Q8_0:
        return torch.from_numpy(dequantize_q8_0(raw))
    if kind in K.Q4_TYPES:
        return torch.from_numpy(dequantize_q4(raw, kind))
    return torch.from_numpy(raw.astype(np.float32))


def _factored(fl) -> BinaryFactoredLinear:
    """A factored linear or table of the file with frozen signs and float32 copies of its fp16 scales."""
    paths = []
    for p in fl.paths:
        mid = None if p.scale_mid is None else p.scale_mid.astype(np.float32)
        u, v = unpack_signs(p.u_signs, p.rank), unpack_signs(p.v_signs, fl.n)
        paths.append(TrainablePath(torch.from_numpy(u), torch.from_numpy(v), p.scale_in.astype(np.float32),
                                p.scale_out.astype(np.float32), mid, frozen=True))
    return BinaryFactoredLinear(paths, None if fl.bias is None else torch.from_numpy(fl.bias.astype(np.float32)))


def load_nq(path: str | os.PathLike) -> TorchModel:
    """Rebuild a TorchModel from a `.nq` file through nqfmt alone: what the file holds, computed in float32."""
    nq = open_nq(path)
    c = nq.config
    blocks = []
    for layer in range(c.n_layers):
        norms = {f"{name}.weight": torch.from_numpy(nq.array(K.norm_tensor(layer, name)).copy())
                 for name in c.block_norms()}
        blocks.append(DecoderBlock(c, layer, norms, {lin: _factored(nq.linear(layer, lin)) for lin in K.LINEARS}))
    output = None if c.tie_embeddings else _table_of(nq, K.OUTPUT_TABLE)
    return TorchModel(c, _table_of(nq, K.EMBD_TABLE), blocks, torch.from_numpy(nq.array(K.OUTPUT_NORM).copy()),
                      output)
