"""Choosing the next token from logits. Order as transformers applies it: repetition penalty, temperature, top-k,
top-p, min-p; temperature 0 means greedy (argmax, no randomness)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import NQRunError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0: no limit
    top_p: float = 0.95  # 1: no limit
    min_p: float = 0.05  # 0: no limit; keeps tokens with p ≥ min_p · p(best)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL / transformers rule)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise NQRunError(f"temperature {self.temperature} must be ≥ 0")
        if self.top_k < 0:
            raise NQRunError(f"top-k {self.top_k} must be ≥ 0")
        if not 0 < self.top_p <= 1:
            raise NQRunError(f"top-p {self.top_p} must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise NQRunError(f"min-p {self.min_p} must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise NQRunError(f"repetition penalty {self.repetition_penalty} must be > 0")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, context: list[int] | None = None) -> int:
        """The next token. The vocabulary-wide steps (penalty, argmax, the top-k partition) run on the logits as
        given; only the candidates are widened to float64 (a float64 copy of every logit cost more per token than
        the choice itself)."""
        p = self.params
        z = np.asarray(logits).reshape(-1)
        if p.repetition_penalty != 1.0 and context:
            z = z.astype(np.float64)
            seen = np.unique(np.asarray(context, dtype=np.int64))
            z[seen] = np.where(z[seen] > 0, z[seen] / p.repetition_penalty, z[seen] * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(z))
        if 0 < p.top_k < len(z):  # partition first: a full sort of the vocabulary costs milliseconds per token
            ids = np.argpartition(-z, p.top_k - 1)[:p.top_k]
        else:
            ids = np.arange(len(z))
        scaled = z[ids].astype(np.float64) / p.temperature
        order = np.argsort(-scaled, kind="stable")
        return self.draw(ids[order], scaled[order])

    def draw(self, ids: np.ndarray, scaled: np.ndarray) -> int:
        """One token from candidates `ids`, best first, whose logits divided by the temperature are `scaled`
        (float64): softmax, then top-p and min-p, then one draw from this sampler's generator."""
        p = self.params
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            ids, probs = ids[:keep], probs[:keep]
        if p.min_p > 0:
            mask = probs >= p.min_p * probs[0]
            ids, probs = ids[mask], probs[mask]
        probs /= probs.sum()
        return int(ids[self.rng.choice(len(ids), p=probs)])
