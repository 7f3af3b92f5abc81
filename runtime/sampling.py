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


TOP_K_GROUP = 64  # logits per group whose maximum top_k looks at first


def top_k(z: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, largest first, equal ones by lower id: the first k of a stable sort of −z.
    The logits fall into groups of TOP_K_GROUP (group j: logits j, j + G, j + 2G, ... for G groups, so that the
    maxima are an elementwise maximum of rows); the k-th largest group maximum is a lower bound of the k-th largest
    logit (k groups each hold one at least that large), so only logits at or above it are sorted: one pass over the
    vocabulary, a partition of G maxima and a sort of a few candidates, instead of a partition of the vocabulary."""
    groups = len(z) // TOP_K_GROUP
    if k >= groups:
        return np.argsort(-z, kind="stable")[:k]
    maxima = z[:groups * TOP_K_GROUP].reshape(TOP_K_GROUP, groups).max(axis=0)
    bound = np.partition(maxima, groups - k)[groups - k]
    candidates = np.flatnonzero(z >= bound)
    return candidates[np.lexsort((candidates, -z[candidates]))[:k]]


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, context: list[int] | None = None) -> int:
        """The next token. The vocabulary-wide steps (penalty, argmax, top-k) run on the logits as given; only the
        candidates are widened to float64 (a float64 copy of every logit cost more per token than the choice
        itself)."""
        p = self.params
        z = np.asarray(logits).reshape(-1)
        if p.repetition_penalty != 1.0 and context:
            z = z.astype(np.float64)
            seen = np.unique(np.asarray(context, dtype=np.int64))
            z[seen] = np.where(z[seen] > 0, z[seen] / p.repetition_penalty, z[seen] * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(z))
        if 0 < p.top_k < len(z):  # a full sort of the vocabulary costs milliseconds per token
            ids = top_k(z, p.top_k)
        else:
            ids = np.argsort(-z, kind="stable")
        return self.draw(ids, z[ids].astype(np.float64) / p.temperature)

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
