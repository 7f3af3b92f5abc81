"""Perplexity on a text, the project's protocol (spec/EVALUATION.md §2): the whole text tokenized once with no BOS,
cut into non-overlapping windows of `ctx` tokens, the first `windows` of them, mean cross-entropy over the
ctx − 1 shifted tokens of each window."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import NQRunError
from .generate import PREFILL_CHUNK
from .model import Model


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    windows: int
    scored_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Tokens run through the model per second (each window runs its ctx − 1 scored positions)."""
        return self.scored_tokens / self.seconds


def perplexity(model: Model, ids: list[int], ctx: int = 2048, windows: int | None = None,
               progress=None) -> PerplexityResult:
    """exp(mean NLL) over the windows; `progress(i, n, running_ppl)` is called after each window."""
    if ctx < 2:
        raise NQRunError(f"--ctx {ctx} must be at least 2")
    if ctx > model.config.context_length:
        raise NQRunError(f"--ctx {ctx} exceeds the model's context of {model.config.context_length}")
    available = len(ids) // ctx
    if available == 0:
        raise NQRunError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}")
    n = available if windows is None else min(windows, available)
    if n < 1:
        raise NQRunError(f"--windows {windows} must be at least 1")
    cache = model.new_cache(ctx)
    total, count = 0.0, 0
    start = time.perf_counter()
    for w in range(n):
        window = np.asarray(ids[w * ctx:(w + 1) * ctx], dtype=np.int64)
        for c0 in range(0, ctx - 1, PREFILL_CHUNK):
            chunk = window[c0:min(c0 + PREFILL_CHUNK, ctx - 1)]  # the last token is only ever a target
            logits = model.forward(chunk, c0, cache, all_logits=True).astype(np.float64)
            targets = window[c0 + 1:c0 + 1 + len(chunk)]
            top = logits.max(axis=1)
            logz = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
            total += float((logz - logits[np.arange(len(chunk)), targets]).sum())
            count += len(chunk)
        if progress is not None:
            progress(w + 1, n, float(np.exp(total / count)))
    return PerplexityResult(float(np.exp(total / count)), n, count, time.perf_counter() - start)
