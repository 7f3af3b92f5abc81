"""The one optimisation loop every tuning stage shares: Adam(0.9, 0.99), per-group cosine decay, seeded batch order.

Block refinement, error mitigation and model reconstruction differ only in their parameters and loss; keeping the
loop in one place keeps their schedules (and so resumed runs) identical by construction.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

Report = Callable[[int, int, float], None]  # (step, steps, loss)


def cosine_lr(base: float, step: int, steps: int, floor: float = 1e-2) -> float:
    """Cosine decay from `base` to floor·base over `steps`."""
    t = min(step / max(steps, 1), 1.0)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def adam_cosine(groups: list[dict], n: int, batch: int, epochs: float, seed: int,
                batch_loss: Callable[[torch.Tensor], torch.Tensor], report: Report) -> float:
    """Run `epochs` passes over n windows in batches drawn in a seeded order, minimising batch_loss(indices); each
    group's lr follows its own cosine schedule from its initial `lr`. A fractional part is a last pass over that
    share of a fresh permutation, so a schedule can be lengthened in steps finer than a whole pass (a time budget
    may hold 1.75 passes, not 2). Returns the last pass's mean loss."""
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    passes = [size for size in [n] * math.floor(epochs) + [round((epochs % 1) * n)] if size > 0]
    steps, step, pass_loss = sum(math.ceil(size / batch) for size in passes), 0, float("nan")
    for size in passes:
        order = torch.randperm(n, generator=gen)[:size]
        total = 0.0
        for i in range(0, size, batch):
            idx = order[i:i + batch]
            for g in opt.param_groups:
                g["lr"] = cosine_lr(g["base_lr"], step, steps)
            loss = batch_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            value = loss.item()
            total += value * len(idx)
            report(step, steps, value)
        pass_loss = total / size
    opt.zero_grad(set_to_none=True)
    return pass_loss
