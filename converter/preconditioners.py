"""Diagonal Fisher preconditioners: input-side activation and output-side gradient second moments of every linear.

For each decoder linear, d_in[j] = sqrt(E[x̃_j²]) over its inputs and d_out[i] = sqrt(E[g̃_i²]) over the gradients of
the next-token loss with respect to its outputs (the paper's preconditioners), with each token vector clipped to the
99.9th percentile of token norms (per batch of stat windows, so that a batch of 2048 tokens clips its 2 largest, as
the official code does per 2048-token sample), then shrunk toward the mean: v ← (1−γ)v + γ·mean(v).

The whole model's autograd graph is never built: one forward pass stores the hidden states at every block boundary
for the (few) statistics windows, the loss gradient is taken at the head, and the gradient is carried back one block
at a time by re-running that block from its stored input. Peak memory is one block's graph plus two boundaries
(the others wait on disk).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from nqfmt import keys as K

from .torch_model import DecoderBlock, TorchModel

PERCENTILE = 0.999


@dataclass
class LayerPreconditioners:
    """Preconditioners of one block: d_in / d_out per linear (mean 1), the block loss's channel weights, and per
    linear the scale the normalisation removes, fisher_scale = mean(√v_in)²·mean(√v_out)² over the shrunk second
    moments v, so that c·(d_out,i·d_in,j)² estimates the diagonal Fisher of weight (i, j) (converter/allocation.py)."""

    d_in: dict[str, torch.Tensor]
    d_out: dict[str, torch.Tensor]
    channel_weight: torch.Tensor
    fisher_scale: dict[str, float]

    @classmethod
    def uniform(cls, config, hidden: int) -> "LayerPreconditioners":
        shapes = {lin: config.linear_shape(lin) for lin in K.LINEARS}
        return cls({lin: torch.ones(n) for lin, (m, n) in shapes.items()},
                   {lin: torch.ones(m) for lin, (m, n) in shapes.items()}, torch.ones(hidden),
                   {lin: 1.0 for lin in K.LINEARS})


class ClippedSecondMoment:
    """Running per-channel mean of x̃² where each token vector x is clipped to the batch's 99.9th-percentile norm."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        norms = flat.norm(dim=1)
        k = max(1, math.floor(flat.shape[0] * (1 - PERCENTILE)))
        tau = torch.topk(norms, k).values[-1]
        clipped = flat * torch.clamp(tau / norms.clamp_min(1e-30), max=1.0)[:, None]
        s = clipped.pow(2).sum(0).to(torch.float64)
        self.total = s if self.total is None else self.total + s
        self.tokens += flat.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.total / max(self.tokens, 1)).to(torch.float32)


def shrink(v: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1−γ)v + γ·mean(v): pulls the second moments toward their mean before the square root."""
    return (1 - gamma) * v + gamma * v.mean()


def preconditioner(v: torch.Tensor, gamma: float) -> torch.Tensor:
    """sqrt of the shrunk second moments, normalised to mean 1 (only relative weights matter to the ADMM)."""
    d = shrink(v, gamma).clamp_min(1e-24).sqrt()
    return d / d.mean()


def scale(v: torch.Tensor, gamma: float) -> float:
    """mean(√shrink(v)): what `preconditioner` divides by."""
    return float(shrink(v, gamma).clamp_min(1e-24).sqrt().mean())


def channel_weight(v: torch.Tensor, gamma: float) -> torch.Tensor:
    """Block-loss weights per hidden channel: the shrunk output-gradient second moments of ffn_down, mean 1."""
    w = shrink(v, gamma).clamp_min(1e-24)
    return w / w.mean()


def _linear_hooks(block: DecoderBlock, acts: dict[str, ClippedSecondMoment], grads: dict[str, ClippedSecondMoment]):
    """Forward hooks recording each linear's input and, through a tensor hook, the gradient at its output."""
    handles = []
    for name, lin in block.linears.items():
        def hook(module, args, out, name=name):
            acts[name].add(args[0])
            if out.requires_grad:
                out.register_hook(lambda g, name=name: grads[name].add(g))
        handles.append(lin.register_forward_hook(hook))
    return handles


def head_gradient(model_head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, tokens: torch.Tensor,
                  total_tokens: int) -> torch.Tensor:
    """∂L/∂h for the mean next-token cross-entropy over all stat windows (this batch's share of it)."""
    h = h.detach().requires_grad_(True)
    logits = model_head(h)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                           reduction="sum") / total_tokens
    (grad,) = torch.autograd.grad(loss, h)
    return grad


class BoundaryStore:
    """Hidden states at every block boundary of the stat windows, kept on disk (one file per boundary) when a
    directory is given, so RAM holds two boundaries at a time however deep the model is."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.memory: dict[int, torch.Tensor] = {}

    def put(self, index: int, h: torch.Tensor) -> None:
        if self.directory is None:
            self.memory[index] = h
        else:
            path = self.directory / f"stat-boundary-{index:03d}.pt"
            try:
                torch.save(h, path)
            except RuntimeError as e:  # torch reports a failed write (a full disk) as a RuntimeError
                path.unlink(missing_ok=True)
                raise OSError(f"cannot write {path}: {str(e).splitlines()[0]}") from e

    def pop(self, index: int) -> torch.Tensor:
        if self.directory is None:
            return self.memory.pop(index)
        path = self.directory / f"stat-boundary-{index:03d}.pt"
        h = torch.load(path, weights_only=True)
        path.unlink()
        return h


def collect_preconditioners(config, embed_head: TorchModel, load_block: Callable[[int], DecoderBlock],
                       tokens: torch.Tensor, gamma: float, batch: int, spill: Path | None = None,
                       progress: Callable[[int, int], None] = lambda i, n: None) -> list[LayerPreconditioners]:
    """Preconditioners for every block from next-token-loss gradients on `tokens` [S, T], block by block.

    `embed_head` supplies `embed` and `head` (its blocks are not used); `load_block(i)` builds full-precision block
    i; boundaries go to files in `spill` when given.
    """
    n = config.n_layers
    batches = [slice(i, i + batch) for i in range(0, tokens.shape[0], batch)]
    total = tokens.shape[0] * (tokens.shape[1] - 1)
    store = BoundaryStore(spill)
    with torch.no_grad():
        h = embed_head.embed(tokens)
        for layer in range(n):
            store.put(layer, h)
            block = load_block(layer)
            h = torch.cat([block(h[b]) for b in batches])
            progress(layer + 1, 2 * n)
            del block
    # one window at a time through the head: its logits (vocab-wide) dominate memory otherwise
    grad = torch.cat([head_gradient(embed_head.head, h[i:i + 1], tokens[i:i + 1], total)
                      for i in range(tokens.shape[0])])
    del h
    result: list[LayerPreconditioners | None] = [None] * n
    for layer in reversed(range(n)):
        block = load_block(layer)
        acts = {lin: ClippedSecondMoment() for lin in K.LINEARS}
        grads = {lin: ClippedSecondMoment() for lin in K.LINEARS}
        handles = _linear_hooks(block, acts, grads)
        x_all = store.pop(layer)
        new_grad = torch.empty_like(x_all)
        for b in batches:
            x = x_all[b].detach().requires_grad_(True)
            y = block(x)
            (new_grad[b],) = torch.autograd.grad(y, x, grad[b])
        for h in handles:
            h.remove()
        grad = new_grad
        result[layer] = LayerPreconditioners(
            {lin: preconditioner(acts[lin].mean(), gamma) for lin in K.LINEARS},
            {lin: preconditioner(grads[lin].mean(), gamma) for lin in K.LINEARS},
            channel_weight(grads[K.FFN_DOWN].mean(), gamma),
            {lin: (scale(acts[lin].mean(), gamma) * scale(grads[lin].mean(), gamma)) ** 2 for lin in K.LINEARS})
        progress(2 * n - layer, 2 * n)
        del block, x_all
    return result
