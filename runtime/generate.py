"""The decode loop: prefill (reusing whatever prefix the KV cache already holds), then one token at a time,
streamed as ids and as text pieces, with stop tokens, stop strings, a token budget and the context limit."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .backends import KVCache
from .errors import NQRunError
from .model import Model
from .sampling import Sampler, SamplingParams
from .tokenizer import TextStream, Tokenizer

PREFILL_CHUNK = 256  # prompt tokens per forward call: bounds activation memory on long prompts


@dataclass
class GenerationStats:
    """Figures of one generation. Decode throughput counts the tokens after the first (each is one single-token
    forward pass plus sampling), timed from the first generated token to the last."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually run (the rest were already in the KV cache)
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    first_token_seconds: float = 0.0  # from the start of the call to the first generated token
    first_token_at: float = 0.0  # time.perf_counter() when the first token was chosen
    stop_reason: str = ""  # "stop token", "stop string", "max tokens", "context full"

    @property
    def decode_tokens(self) -> int:
        return max(self.generated_tokens - 1, 0)

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Generator:
    """A model with its KV cache and the token ids that cache currently holds (so a follow-up prompt that starts
    the same way, e.g. the next chat turn, only runs its new tokens)."""

    def __init__(self, model: Model, n_ctx: int | None = None) -> None:
        self.model = model
        self.n_ctx = model.config.context_length if n_ctx is None else n_ctx
        model.check_context(self.n_ctx)  # at load, not at the first generation
        self._cache: KVCache | None = None
        self._decoder = None  # the backend's device decoder over the cache, made on first use
        self.cached: list[int] = []

    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            self._cache = self.model.new_cache(self.n_ctx)
        return self._cache

    def prefill(self, ids: list[int]) -> tuple[np.ndarray, int]:
        """Logits after the last of `ids` (1, vocab), and how many tokens had to run."""
        if not ids:
            raise NQRunError("the prompt is empty: nothing to continue from")
        if len(ids) >= self.n_ctx:
            raise NQRunError(f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx}, leaving no room "
                             f"to generate (shorten the prompt or raise --ctx, at most "
                             f"{self.model.config.context_length})")
        reuse = 0
        limit = min(len(self.cached), len(ids) - 1)
        while reuse < limit and self.cached[reuse] == ids[reuse]:
            reuse += 1
        self.cached = self.cached[:reuse]
        logits = None
        for start in range(reuse, len(ids), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            logits = self.model.forward(np.asarray(chunk), start, self.cache)
            self.cached += chunk
        return logits, len(ids) - reuse

    def step(self, token: int) -> np.ndarray:
        """Append one token; its logits (1, vocab)."""
        logits = self.model.forward(np.asarray([token]), len(self.cached), self.cache)
        self.cached.append(token)
        return logits

    def device_decoder(self, params: SamplingParams) -> Any | None:
        """The backend's device decoder where it has one and can draw with these settings (greedy, or a top-k it
        holds), else None."""
        if self._decoder is None:
            self._decoder = self.model.backend.decoder(self.model, self.cache) or False
        if not self._decoder:
            return None
        greedy = params.temperature == 0
        return self._decoder if greedy or 0 < params.top_k <= self._decoder.max_top_k else None

    def _next(self, token: int, sampler: Sampler, decoder: Any | None) -> int:
        """Append `token` and draw the one after it: on the device where a decoder serves, else from the logits."""
        if decoder is None:
            return sampler(self.step(token)[-1], self.cached)
        pos = len(self.cached)
        self.cached.append(token)
        p = sampler.params
        if p.temperature == 0 and p.repetition_penalty == 1.0:
            return decoder.greedy(token, pos)
        return decoder.sample(token, pos, sampler)

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits after every position of `ids`, (len(ids), vocab), from an empty context."""
        if not ids:
            raise NQRunError("no token ids given")
        if len(ids) > self.n_ctx:
            raise NQRunError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        self.cached = []
        out = []
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            out.append(self.model.forward(np.asarray(chunk), start, self.cache, all_logits=True))
            self.cached += chunk
        return np.concatenate(out)

    def tokens(self, prompt: list[int], max_tokens: int, sampler: Sampler, stop_ids: frozenset[int],
               stats: GenerationStats) -> Iterator[int]:
        """Generated ids, one at a time (a stop token ends the stream and is not yielded)."""
        if max_tokens < 1:
            raise NQRunError(f"max tokens {max_tokens} must be at least 1")
        start = time.perf_counter()
        logits, stats.prefill_tokens = self.prefill(prompt)
        stats.prompt_tokens = len(prompt)
        stats.prefill_seconds = time.perf_counter() - start
        first = None
        p = sampler.params
        decoder = self.device_decoder(p)
        if decoder is not None and (p.temperature != 0 or p.repetition_penalty != 1.0):
            decoder.start_sampling(self.cached, p.repetition_penalty)
        token = sampler(logits[-1], self.cached)
        while True:
            now = time.perf_counter()
            if first is None:
                first = stats.first_token_at = now
                stats.first_token_seconds = now - start
            if token in stop_ids:
                stats.stop_reason = "stop token"
                return
            stats.generated_tokens += 1
            stats.decode_seconds = now - first
            yield token
            if stats.generated_tokens >= max_tokens:
                stats.stop_reason = "max tokens"
                return
            if len(self.cached) >= self.n_ctx:
                stats.stop_reason = "context full"
                return
            token = self._next(token, sampler, decoder)


def text_pieces(tokens: Iterator[int], tokenizer: Tokenizer, stop: tuple[str, ...],
                stats: GenerationStats) -> Iterator[str]:
    """Generated text as it becomes final: text that might be the start of a stop string is held back until it
    is clear; a stop string ends the generation and is not part of the output."""
    stream = TextStream(tokenizer)
    pending = ""
    for token in tokens:
        pending += stream.push(token)
        cut = _first_stop(pending, stop)
        if cut >= 0:
            stats.stop_reason = "stop string"
            if pending[:cut]:
                yield pending[:cut]
            tokens.close()
            return
        hold = _partial_stop(pending, stop)
        if len(pending) > hold:
            yield pending[:len(pending) - hold]
            pending = pending[len(pending) - hold:]
    pending += stream.flush()
    cut = _first_stop(pending, stop)
    if cut >= 0:
        stats.stop_reason = "stop string"
        pending = pending[:cut]
    if pending:
        yield pending


def _first_stop(text: str, stop: tuple[str, ...]) -> int:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


def _partial_stop(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
