"""Text sampled from the full-precision model, as extra distillation windows once the calibration text is used up.

`standard` distils on 2000 of the 2009 windows the default text holds, and a second pass over the same windows buys
about a third of what fresh windows do. Text the teacher writes itself, continuing a short prompt cut from a
calibration window, is fresh: its KL targets are the teacher's own distribution on a sequence nobody has distilled
on yet (LLM-QAT, Liu et al. 2023, distils on such text alone).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .model import KVCache, TorchModel


def draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of `probs` [B, V] by inverting its cumulative distribution at a uniform draw.
    `torch.multinomial` draws an exponential for every vocabulary entry: 40% of a sampling step on a 49k vocabulary
    (96 ms of 240 at batch 128), where this costs one cumulative sum."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=gen) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


@torch.no_grad()
def sample_windows(model: TorchModel, prompts: torch.Tensor, length: int, batch: int, seed: int,
                   temperature: float = 1.0, report: Callable[[int], None] | None = None) -> torch.Tensor:
    """[N, length] int64: each prompt [N, P] continued by `length` − P tokens sampled at `temperature` from `model`,
    `batch` sequences at a time with a KV cache; the draws come from a generator seeded by `seed` alone. The model
    may be a bfloat16 copy (`TorchModel.to(torch.bfloat16)`): the logits are sampled in float32 either way.
    `report(done)` hears the windows finished so far."""
    n, p = prompts.shape
    if not 0 < p < length:
        raise ValueError(f"a prompt of {p} tokens cannot start a window of {length}")
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, length, dtype=torch.int64)
    out[:, :p] = prompts
    for i in range(0, n, batch):
        rows = out[i:i + batch]
        cache = KVCache(len(model.blocks), length)
        step = rows[:, :p]
        for pos in range(p, length):
            logits = model(step, cache=cache)[:, -1].float()
            probs = torch.softmax(logits / temperature, dim=-1)
            rows[:, pos] = draw(probs, gen)
            step = rows[:, pos:pos + 1]
        if report is not None:
            report(i + rows.shape[0])
    return out


def write_windows(model: TorchModel, drawn: torch.Tensor, n: int, prompt: int, seed: int, temperature: float,
                  report: Callable[[int], None] | None = None) -> torch.Tensor:
    """`n` windows as long as the drawn ones [N, T], the i-th continuing the first `prompt` tokens of drawn window
    i mod N: the one rule the pipeline (`Recipe.recon_written`) and bench/recon_probe.py both write by, in batches
    of 128 (on the 2-core EPYC, 128 windows at batch 128 took 63 s, 64 windows at batch 64 took 64 s)."""
    prompts = drawn[torch.arange(n) % drawn.shape[0], :prompt]
    return sample_windows(model, prompts, drawn.shape[1], 128, seed, temperature, report)
