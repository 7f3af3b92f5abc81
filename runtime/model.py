"""The decoder forward pass, written once for every supported architecture against the `Backend` interface.

Llama / SmolLM / Mistral are the plain case; the others switch on config fields, never on the arch name alone:
Qwen2 adds q/k/v biases (carried by the factored linear), Qwen3 RMS-normalizes each query/key head before RoPE,
Gemma 3 adds post-attention/post-FFN norms, (1+w) norms (config.norm_offset), GeGLU, embedding and attention
scales, softcaps, and sliding-window layers that use their own RoPE base (config.rope_theta_local).
"""
from __future__ import annotations

import math
import os
import resource
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from nqfmt.keys import GGMLType

from nqfmt import HotRows, LinearPlan, ModelConfig, NQFile, NQFormatError
from nqfmt.layout import table_kind_name
from nqfmt import keys as K

from .backends import Backend, KVCache
from .errors import NQRunError


@dataclass
class Block:
    """One decoder block's weights, prepared by the backend."""

    norms: dict[str, Any]
    linears: dict[str, Any]
    sliding: bool


def rope_inv_freq(config: ModelConfig, local: bool) -> np.ndarray:
    """Inverse frequencies of rotate-half RoPE, computed in float32 as transformers does.

    Local (sliding-window) layers of Gemma 3 use rope_theta_local unscaled; every other layer uses rope_theta with
    the configured scaling (linear: divide by the factor; llama3: the wavelength-banded schedule).
    """
    d = config.head_dim
    theta = config.rope_theta_local if local else config.rope_theta
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)
    if local and config.arch == "gemma3":
        return inv
    factor = config.rope_scaling_factor
    if config.rope_scaling_type == "linear":
        return (inv / np.float32(factor)).astype(np.float32)
    if config.rope_scaling_type == "llama3":
        old = config.rope_original_context
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


NORM_LIMIT = 1e6  # |norm weight| of any trained model is orders of magnitude below


def memory_available() -> int:
    """Bytes this process may still allocate: physical memory and swap, and the address-space limit (RLIMIT_AS)
    less what is mapped already, where one is set."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            swap = next((int(line.split()[1]) * 1024 for line in f if line.startswith("SwapTotal:")), 0)
    except OSError:
        swap = 0
    have = total + swap
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            mapped = 0
        have = min(have, soft - mapped)
    return max(have, 0)


class Model:
    """A `.nq` file's decoder on one backend: `forward(ids, pos0, cache)` → logits of one sequence;
    `step(ids, positions, caches)` → the next-token logits of several sequences in one batched pass."""

    def __init__(self, nq: NQFile, backend: Backend) -> None:
        self.config = cfg = nq.config
        self.backend = backend
        self.nq = nq
        self.embedding_type = table_kind_name(nq.tables[K.EMBD_TABLE])
        self.embedding = _prepared_table(nq, K.EMBD_TABLE, backend)
        self.head_table = self.embedding if cfg.tie_embeddings else _prepared_table(nq, K.OUTPUT_TABLE, backend)
        self.output_norm = self._norm(nq, K.OUTPUT_NORM)
        self.blocks = []
        for layer in range(cfg.n_layers):
            norms = {nm: self._norm(nq, K.norm_tensor(layer, nm)) for nm in cfg.block_norms()}
            linears = {}
            for name in K.LINEARS:
                lin = nq.linear(layer, name)
                if lin.bias is not None and not np.all(np.isfinite(lin.bias)):
                    raise NQFormatError(f"tensor {K.bias_tensor(layer, name)!r}: non-finite bias")
                linears[name] = backend.prepare_linear(lin)
                if backend.copies_weights:
                    nq.release(*(a for p in lin.paths for a in (p.v_signs, p.u_signs)))
            self.blocks.append(Block(norms, linears, cfg.sliding_layers[layer]))
        self._inv_freq = {local: rope_inv_freq(cfg, local) for local in (False, True)}
        self._fused = backend.fused_blocks(self)  # a decoding step's blocks in one backend call, where it has one
        self._step_pool: ThreadPoolExecutor | None = None  # the extra threads of a split step (Backend.step_threads)

    def _norm(self, nq: NQFile, name: str) -> Any:
        w = nq.array(name)
        if not np.all(np.isfinite(w)):
            raise NQFormatError(f"tensor {name!r}: non-finite norm weight")
        if np.abs(w).max() > NORM_LIMIT:
            raise NQFormatError(f"tensor {name!r}: norm weight {float(np.abs(w).max()):.3g} is outside "
                                f"±{NORM_LIMIT:g}, beyond any model's")
        return self.backend.vector(self.config.norm_offset + w.astype(self.backend.dtype))

    def check_context(self, n: int) -> None:
        """Refuse a context the model does not have, or whose KV cache would not fit in the memory this process may
        use (checked before anything is allocated: the file's context length is just a number)."""
        if not 0 < n <= self.config.context_length:
            raise NQRunError(f"context size {n} must be between 1 and the model's {self.config.context_length}")
        c = self.config
        need = 2 * c.n_layers * c.n_kv_heads * n * c.head_dim * np.dtype(self.backend.dtype).itemsize
        have = memory_available()
        if need > have:
            origin = " (the file's nanoquant.context_length)" if n == c.context_length else ""
            raise NQRunError(f"a context of {n} tokens{origin} needs {need / 2**30:.1f} GiB of KV cache, more than "
                             f"the {have / 2**30:.1f} GiB this process may use; ask for a shorter one (--ctx)")

    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        n = self.config.context_length if n_ctx is None else n_ctx
        self.check_context(n)
        return self.backend.kv_cache(self.config, n)

    def warm_up(self) -> None:
        """One throwaway single-token step, so a JIT backend loads its compiled kernels now rather than inside the
        first prefill (whose speed figure would otherwise mostly measure kernel loading)."""
        self.forward(np.zeros(1, dtype=np.int64), 0, self.new_cache(1))

    def _rope_tables(self, positions: np.ndarray) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
        tables = {}
        for local, inv in self._inv_freq.items():
            angles = (positions[:, None].astype(np.float32) * inv[None, :]).astype(np.float64)  # float32, as HF
            tables[local] = (np.cos(angles).astype(self.backend.dtype), np.sin(angles).astype(self.backend.dtype))
        return tables

    def forward(self, ids: np.ndarray, pos0: int, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens `ids` at positions pos0.. (their keys/values go into `cache`); return the logits of the last
        token, (1, vocab), or of every token when `all_logits`."""
        ids = self._checked_ids(ids)
        t = len(ids)
        if pos0 + t > cache.n_ctx:
            raise NQRunError(f"{pos0 + t} tokens do not fit the context of {cache.n_ctx}")

        x = self._hidden(ids, pos0, cache)
        return self._logits(x if all_logits else x[-1:])

    def _hidden(self, ids: np.ndarray, pos0: int, cache: KVCache) -> Any:
        """The last block's outputs (T, hidden) for tokens ids at positions pos0.. of one sequence: through the fused
        blocks where they take this many tokens, else op by op."""
        cfg, be = self.config, self.backend
        t = len(ids)

        def attend(layer: int, q: Any, k: Any, v: Any, window: int) -> Any:
            return be.attention(cache, layer, q, k, v, pos0, window, cfg.attention_scale, cfg.attn_softcap)

        if self._fused is not None and t <= self._fused.max_tokens:
            return self._fused(self._embed(ids), np.arange(pos0, pos0 + t), [cache] * t)
        return self._decoder(ids, np.arange(pos0, pos0 + t), attend)

    def step(self, ids: np.ndarray, positions: np.ndarray, caches: list[KVCache],
             counts: np.ndarray | None = None) -> np.ndarray:
        """One batched pass over the next tokens of B independent sequences. Sequence b runs counts[b] tokens (default
        one each: a decoding step), the next counts[b] of `ids`, at positions positions[b], positions[b] + 1, ...;
        its earlier keys/values are in caches[b], and these tokens' are stored there too. Embedding, norms, linears,
        RoPE, GLU and the head run on all rows at once, so each weight is read once per pass for the whole batch;
        attention runs per sequence over its own cache (with fused blocks, see _fused_step). Returns the logits after
        each sequence's last token, (B, vocab): row b is what forward(its tokens, positions[b], caches[b]) returns."""
        cfg, be = self.config, self.backend
        ids = self._checked_ids(ids)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        counts = np.ones(len(caches), np.int64) if counts is None else np.asarray(counts, np.int64).reshape(-1)
        if not len(positions) == len(caches) == len(counts) or counts.sum() != len(ids) or counts.min() < 1:
            raise NQRunError(f"{len(ids)} tokens for {len(positions)} positions, {len(caches)} caches and token "
                             f"counts {counts.tolist()}: one position, cache and count (≥ 1) per sequence, and as many "
                             f"tokens as the counts add up to")
        for pos, n, cache in zip(positions, counts, caches):
            if not (0 <= pos and pos + n <= cache.n_ctx):
                raise NQRunError(f"positions {pos}..{pos + n - 1} are outside the context of {cache.n_ctx}")
        ends = np.cumsum(counts)
        token_positions = np.concatenate([np.arange(p, p + n) for p, n in zip(positions, counts)])
        if self._fused is not None:
            return self._logits(self._fused_step(ids, positions, caches, counts, token_positions))

        def run(lo: int, hi: int) -> Any:  # sequences lo..hi-1 through every block
            def attend(layer: int, q: Any, k: Any, v: Any, window: int) -> Any:
                return be.attention_batch(caches[lo:hi], layer, q, k, v, counts[lo:hi], positions[lo:hi], window,
                                          cfg.attention_scale, cfg.attn_softcap)

            first, end = ends[lo] - counts[lo], ends[hi - 1]
            return self._decoder(ids[first:end], token_positions[first:end], attend)

        groups = _split(counts, be.step_threads(len(ids), len(caches)))
        if len(groups) == 1:
            x = run(0, len(caches))
        else:
            def alone(lo: int, hi: int) -> Any:
                with be.one_thread():
                    return run(lo, hi)

            if self._step_pool is None:
                self._step_pool = ThreadPoolExecutor(len(groups) - 1, thread_name_prefix="nq-step")
            later = [self._step_pool.submit(alone, lo, hi) for lo, hi in groups[1:]]
            x = np.concatenate([alone(*groups[0])] + [f.result() for f in later])
        return self._logits(x if len(x) == len(caches) else x[ends - 1])

    def _fused_step(self, ids: np.ndarray, positions: np.ndarray, caches: list[KVCache], counts: np.ndarray,
                    token_positions: np.ndarray) -> np.ndarray:
        """The last hidden state of each sequence of a step, (B, hidden), each computed the way forward() computes it
        alone: the sequences whose tokens the fused blocks take (decoding tokens, prompts of up to max_tokens) in one
        fused call, whose results do not depend on the other sequences in it, and each longer prompt op by op on its
        own. So a sequence's text does not depend on what joins its step, also where the fused and the op-by-op
        kernels round differently (the fixed-point kernels, runtime/README.md)."""
        starts = np.cumsum(counts) - counts
        last = np.empty((len(caches), self.config.hidden), self.backend.dtype)
        fused = np.flatnonzero(counts <= self._fused.max_tokens)
        if len(fused):
            rows = np.concatenate([np.arange(starts[b], starts[b] + counts[b]) for b in fused])
            x = self._fused(self._embed(ids[rows]), token_positions[rows],
                            [caches[b] for b in fused for _ in range(counts[b])])
            last[fused] = x[np.cumsum(counts[fused]) - 1]
        for b in np.flatnonzero(counts > self._fused.max_tokens):
            last[b] = self._hidden(ids[starts[b]:starts[b] + counts[b]], positions[b], caches[b])[-1]
        return last

    def _checked_ids(self, ids: np.ndarray) -> np.ndarray:
        vocab = self.config.vocab
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            raise NQRunError("no tokens to run")
        if ids.min() < 0 or ids.max() >= vocab:
            raise NQRunError(f"token id {int(ids.max() if ids.max() >= vocab else ids.min())} is outside the "
                             f"model's vocabulary of {vocab}")
        return ids

    def _decoder(self, ids: np.ndarray, positions: np.ndarray,
                 attend: Callable[[int, Any, Any, Any, int], Any]) -> Any:
        """The hidden states after every block, (T, hidden), for token ids[i] at positions[i]; `attend(layer, q, k,
        v, window)` stores the keys/values and returns the attention output (T, heads·head_dim)."""
        cfg, be = self.config, self.backend
        t = len(ids)
        ropes = self._rope_tables(positions)
        heads, kv_heads, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        x = self._embed(ids)
        for layer, blk in enumerate(self.blocks):
            nrm, lin = blk.norms, blk.linears
            h = be.rms_norm(x, nrm[K.ATTN_NORM], cfg.norm_eps)
            q = be.linear(lin[K.ATTN_Q], h).reshape(t, heads, d)
            k = be.linear(lin[K.ATTN_K], h).reshape(t, kv_heads, d)
            v = be.linear(lin[K.ATTN_V], h).reshape(t, kv_heads, d)
            if cfg.qk_norm:
                q = be.rms_norm(q, nrm[K.ATTN_Q_NORM], cfg.norm_eps)
                k = be.rms_norm(k, nrm[K.ATTN_K_NORM], cfg.norm_eps)
            local = blk.sliding
            cos, sin = ropes[local]
            q, k = be.rope(q, cos, sin), be.rope(k, cos, sin)
            a = attend(layer, q, k, v, cfg.sliding_window if local else 0)
            o = be.linear(lin[K.ATTN_OUT], a)
            if cfg.post_norms:
                o = be.rms_norm(o, nrm[K.ATTN_POST_NORM], cfg.norm_eps)
            x = x + o
            h = be.rms_norm(x, nrm[K.FFN_NORM], cfg.norm_eps)
            f = be.linear(lin[K.FFN_DOWN], be.glu(be.linear(lin[K.FFN_GATE], h), be.linear(lin[K.FFN_UP], h),
                                                  cfg.activation))
            if cfg.post_norms:
                f = be.rms_norm(f, nrm[K.FFN_POST_NORM], cfg.norm_eps)
            x = x + f
        return x

    def _embed(self, ids: np.ndarray) -> Any:
        x = self.backend.embed(self.embedding, ids)
        scale = self.config.embedding_scale
        return x if scale == 1.0 else x * self.backend.dtype.type(scale)

    def _logits(self, x: Any) -> np.ndarray:
        cfg, be = self.config, self.backend
        logits = be.head(self.head_table, be.rms_norm(x, self.output_norm, cfg.norm_eps))
        if cfg.final_softcap > 0:
            logits = cfg.final_softcap * np.tanh(logits / cfg.final_softcap)
        if not (np.isfinite(logits.max()) and np.isfinite(logits.min())):  # NaN propagates; no V-sized temporary
            raise NQRunError("the model's output is not finite (inf or NaN logits): the file's weights or settings "
                             "overflow float32")
        return logits


def _split(counts: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Sequences 0..len(counts)-1 cut into at most `parts` runs of consecutive sequences with about equal token counts,
    as (first, end) pairs."""
    total, bounds = int(counts.sum()), [0]
    done = 0
    for b, n in enumerate(counts[:-1]):
        done += int(n)
        if len(bounds) < parts and done >= total * len(bounds) / parts:
            bounds.append(b + 1)
    bounds.append(len(counts))
    return list(zip(bounds[:-1], bounds[1:]))


def _prepared_table(nq: NQFile, table: str, backend: Backend) -> Any:
    """The embedding (K.EMBD_TABLE) or untied head (K.OUTPUT_TABLE) as the backend runs it: a dense table checked
    finite, or a binary-factored one (its scales are checked finite by the reader). Where the backend computes from
    copies (repacked signs or 4-bit codes), the file's pages of what it copied leave the resident set."""
    kind = nq.tables[table]
    if isinstance(kind, LinearPlan):
        factored = nq.factored_table(table)
        prepared = backend.prepare_factored_table(factored)
        copied = [a for p in factored.paths for a in (p.v_signs, p.u_signs)]
    elif isinstance(kind, HotRows):
        hot_ids = nq.hot_table(table)[1]
        cold = _checked_table(nq, K.dense_table_tensor(table))
        prepared = backend.prepare_hot_table(cold, kind.gtype, hot_ids, _checked_table(nq, K.hot_rows_tensor(table)),
                                             nq.config.vocab, nq.config.hidden)
        copied = [cold]
    else:
        dense = _checked_table(nq, K.dense_table_tensor(table))
        prepared = backend.prepare_embedding(dense, kind, nq.config.hidden)
        copied = [dense] if kind in (GGMLType.Q4_0, GGMLType.IQ4_NL) else []
    if backend.copies_weights:
        nq.release(*copied)
    return prepared


def _checked_table(nq: NQFile, name: str) -> np.ndarray:
    """An embedding/head view, after checking every value is finite (a NaN row would poison every logit).
    F16 is checked on its bits (exponent all ones), so the table is never upcast; the block types on their block
    scales."""
    table = nq.array(name)
    gtype = nq.tensors[name].gtype
    if gtype == GGMLType.F16:
        bad = _any_f16_nonfinite(table.view(np.uint16))
    elif gtype in K.BLOCK_TYPES:
        size = K.TYPE_SIZES[gtype][1]
        scales = np.ascontiguousarray(table.reshape(table.shape[0], -1, size)[:, :, :2]).view(np.uint16)
        bad = _any_f16_nonfinite(scales)
    else:
        bad = not np.all(np.isfinite(table))
    if bad:
        raise NQFormatError(f"tensor {name!r}: non-finite values")
    return table


def _any_f16_nonfinite(bits: np.ndarray, chunk: int = 1 << 20) -> bool:
    """Any half with an all-ones exponent (inf/NaN), checked a chunk at a time: whole-table temporaries would add
    1.5× the table to peak memory."""
    flat = bits.reshape(-1)
    exponent = np.uint16(0x7C00)
    return any(bool(((flat[i:i + chunk] & exponent) == exponent).any()) for i in range(0, flat.size, chunk))
