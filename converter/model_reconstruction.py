"""Model reconstruction: tune only the scales so the quantized model's next-token distribution matches the teacher's.

The teacher's logits are never kept for the whole vocabulary (tens of GB for a 7B model's calibration set).
For every calibration token we keep the teacher's top-k log-probabilities and their ids, and the tail mass
1 − Σ top-k as one extra bucket. The loss is the exact KL divergence between the two distributions coarsened to
those k + 1 outcomes, KL(p̄_T ‖ p̄_S) = Σ_top p_T (log p_T − log p_S) + p_T,tail (log p_T,tail − log p_S,tail), where
p_S,tail is the student's mass outside the teacher's top-k (1 − its top-k mass). With k = 64 it
covers ≥ 90% of the teacher's mass on typical tokens, and the tail bucket keeps the student from piling mass there.
Cache size: windows × tokens × k × 8 bytes (33 MB for 256 × 256 × 64). Optionally the loss adds the student's
cross-entropy on the calibration text's own next tokens (`ce_weight`), which the coarsened KL knows nothing of when
the next token lies in the teacher's tail.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .block_reconstruction import bf16_autocast, factored_linears
from .torch_model import TorchModel
from .optim import Report, adam_cosine

TOP_K = 64


@dataclass
class TeacherCache:
    """Top-k teacher log-probabilities [N, T, k] (float32), their token ids [N, T, k] (int32), log tail mass [N, T]."""

    logp: torch.Tensor
    ids: torch.Tensor
    log_tail: torch.Tensor


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable on both ends (clamped so an all-in-top-k token stays finite)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_tail(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ top-k probabilities): the tail bucket, defined the same way for the teacher and the student."""
    return _log1mexp(torch.logsumexp(top_logp, dim=-1))


@torch.no_grad()
def teacher_cache(head: Callable[[torch.Tensor], torch.Tensor], final_hidden: torch.Tensor, k: int,
                  batch: int, bf16: bool = False) -> TeacherCache:
    """Top-k cache from the full-precision model's last hidden states (the FP trajectory after the last block); with
    `bf16` the head's matmul runs in bfloat16 (the log-softmax stays float32), as the teacher's blocks do.

    The outputs are allocated once up front and filled in place: keeping small per-batch results alive between the
    large transient log-softmax buffers fragmented glibc's heap until 1024 windows of 128 tokens were killed for
    memory at 24 GB."""
    n, t = final_hidden.shape[:2]
    cache = None
    for i in range(0, n, batch):
        with bf16_autocast(bf16):
            logits = head(final_hidden[i:i + batch])
        logp = torch.log_softmax(logits.float(), dim=-1)
        del logits
        top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
        if cache is None:
            kk = top.values.shape[-1]
            cache = TeacherCache(torch.empty(n, t, kk), torch.empty(n, t, kk, dtype=torch.int32), torch.empty(n, t))
        cache.logp[i:i + batch] = top.values
        cache.ids[i:i + batch] = top.indices
        cache.log_tail[i:i + batch] = _log_tail(top.values)
        del logp, top
    return cache


def coarse_kl(logp_s: torch.Tensor, logp_t: torch.Tensor, ids: torch.Tensor, log_tail_t: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the KL between teacher and student coarsened to top-k + tail (see module docstring), from
    the student's full-vocabulary log-probabilities (taken once per step and shared with `next_token_ce`).

    The student's tail is 1 − its top-k mass, taken from the k gathered log-probs: a log-sum-exp over the masked
    vocabulary gives the same value with two more full-vocabulary passes forward and three backward. Its float32
    error is ~1e-7 absolute in the tail mass, which only matters where the teacher's own tail, the term's weight, is
    as small."""
    top_s = logp_s.gather(-1, ids.long())
    tail_s = _log_tail(top_s)
    p_t = logp_t.exp()
    kl = (p_t * (logp_t - top_s)).sum(-1) + log_tail_t.exp() * (log_tail_t - tail_s)
    return kl.mean()


def scale_parameters(model: TorchModel) -> list[torch.nn.Parameter]:
    """Every scale of the decoder linears and of a Q4_0 or binary-factored embedding / head (the head as the file
    stores it: distillation tunes its scales like the others)."""
    tables = [s for table in model.scaled_tables() for s in table.scales()]
    return [s for block in model.blocks for lin in factored_linears(block) for s in lin.scales()] + tables


def next_token_ce(logp_s: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's log-probabilities against the window's next token (the last position
    has none)."""
    return torch.nn.functional.nll_loss(logp_s[:, :-1].flatten(0, 1), tokens[:, 1:].flatten().long())


def reconstruct(model: TorchModel, tokens: torch.Tensor, cache: TeacherCache, epochs: float, batch: int,
                lr: float, seed: int, report: Report, ce_weight: float = 0.0) -> float:
    """Adam(0.9, 0.99) with cosine decay on the scales (each at lr × its mean |value|), batches of windows in a
    seeded order; everything else is frozen. The loss is the coarsened KL plus `ce_weight` × the next-token
    cross-entropy on `tokens` themselves: the KL cannot say which of the teacher's tail tokens comes next, the text
    can. Returns the last epoch's mean loss."""
    scales = scale_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in scales:
        p.requires_grad_(True)
    groups = [{"params": [s], "lr": lr * float(s.detach().abs().mean())} for s in scales]

    def loss(idx: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(model(tokens[idx]), dim=-1)
        total = coarse_kl(logp, cache.logp[idx], cache.ids[idx], cache.log_tail[idx])
        if ce_weight > 0:
            total = total + ce_weight * next_token_ce(logp, tokens[idx])
        return total

    return adam_cosine(groups, tokens.shape[0], batch, epochs, seed, loss, report)
