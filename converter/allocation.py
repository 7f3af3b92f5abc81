"""Where the bits go: each decoder linear's total rank, at a fixed total of bits over the decoder linears.

`uniform` gives every linear the ranks of the target (`nqfmt.bits.ranks_for_bits`), the same in every block.

`fisher` spends the same bits where they lower the loss most, by a second-order estimate of the loss a linear's
error costs. Under the diagonal empirical Fisher the preconditioners already estimate (stage 2), an error ΔW of a
linear raises the next-token loss by about ½·Σ_ij E[g_i²]·E[x_j²]·ΔW_ij² = ½·c·‖diag(d_out)·ΔW·diag(d_in)‖², where d_in,
d_out are the linear's normalised preconditioners and c their scale (`LayerPreconditioners.fisher_scale`), which the
normalisation removes and which differs across linears and blocks by orders of magnitude. The error of binary
factors of total rank R is estimated from the singular values σ of the preconditioned weight: it is about the error
of the best continuous approximation of rank k(R) = t·(1 − exp(−R / 2t)), t = min(m, n), i.e. c·Σ_{i>k(R)} σ_i² —
a binary rank is worth about half a continuous one at low rank, less as the rank grows, and residual paths keep
adding (fitted on SmolLM2-135M's weights, spec/CONVERTER.md "Rank allocation"). Starting from the smallest rank,
ranks grow 32 at a time wherever the estimate falls most per bit spent (the estimate is convex in R, so this greedy
rule is optimal for it), until no step fits the budget; each total rank is split into paths by `split_rank`.

`last-block` keeps the uniform ranks everywhere but in the last block, whose linears grow by the same Fisher rule
into all the bits the target leaves (the uniform ranks round down, in every block). Block-wise reconstruction refines
each block on the inputs the quantized blocks before it produce, so a block's error is partly corrected by the
blocks after it; the last block's error reaches the head uncorrected. Measured on SmolLM2-135M (spec/CONVERTER.md
"Rank allocation"): restoring the last block alone to full precision removes 26% of the model's loss, no other block
more than 10%.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nqfmt import keys as K
from nqfmt.bits import linear_bits, split_rank

from .block_reconstruction import Ranks, block_ranks
from .preconditioners import LayerPreconditioners

ALLOCATIONS = ("uniform", "fisher", "last-block")
MAX_PATHS = 4  # a linear's total rank stays within this many full-rank paths


@dataclass
class _Linear:
    """One linear's allocation state: its shape, the Fisher-weighted error estimate at every total rank (index r /
    unit), and the total rank it holds."""

    layer: int
    name: str
    m: int
    n: int
    tail: torch.Tensor  # tail[k] = c·Σ_{i ≥ k·unit} σ_i² (k = 0 .. len − 1), float64
    unit: int
    units: int = 1

    def bits(self, units: int) -> int:
        return linear_bits(self.m, self.n, split_rank(units * self.unit, self.m, self.n))

    def gain(self) -> tuple[float, int] | None:
        """(error drop per bit, bits) of one more rank step, or None at the cap."""
        nxt = self.units + 1
        if nxt >= len(self.tail):
            return None
        cost = self.bits(nxt) - self.bits(self.units)
        return float(self.tail[self.units] - self.tail[nxt]) / cost, cost


def effective_rank(total: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The continuous rank whose best approximation errs as much as binary factors of total rank `total`."""
    top = min(m, n)
    return top * (1 - torch.exp(-total.double() / (2 * top)))


def error_tail(weight: torch.Tensor, d_in: torch.Tensor, d_out: torch.Tensor, scale: float, unit: int,
               max_rank: int) -> torch.Tensor:
    """The Fisher estimate of the loss at total binary rank 0, unit, 2·unit, ... up to max_rank (float64):
    c·Σ_{i > k} σ_i²(diag(d_out)·W·diag(d_in)) at k = effective_rank(R), interpolated between integer ranks."""
    m, n = weight.shape
    wt = d_out.double()[:, None] * weight.double() * d_in.double()[None, :]
    energy = torch.linalg.svdvals(wt).pow(2)
    tails = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # tails[k] = Σ_{i ≥ k} σ_i²
    k = effective_rank(torch.arange(0, max_rank + 1, unit), m, n).clamp(max=len(energy))
    low = k.floor().long().clamp(max=len(energy) - 1)
    frac = k - low
    return scale * (tails[low] * (1 - frac) + tails[low + 1] * frac)


def _estimates(config, block_weights: Callable[[int], dict[str, torch.Tensor]],
               preconditioners: list[LayerPreconditioners], layers: range) -> list[_Linear]:
    """The allocation state of every linear of `layers`, each at one rank step."""
    linears = []
    for layer in layers:
        w, pre = block_weights(layer), preconditioners[layer]
        for name in K.LINEARS:
            m, n = config.linear_shape(name)
            unit = min(32, m, n)
            cap = MAX_PATHS * min(m, n) // unit * unit
            tail = error_tail(w[f"{name}.weight"], pre.d_in[name], pre.d_out[name], pre.fisher_scale[name], unit, cap)
            linears.append(_Linear(layer, name, m, n, tail, unit))
    return linears


def _grow(linears: list[_Linear], budget: float) -> None:
    """Grow the linears' ranks one step at a time where the estimate falls most per bit, while steps fit `budget`
    (the bits these linears may hold in all)."""
    spent = sum(lin.bits(lin.units) for lin in linears)
    heap = [(-g[0], i, g[1]) for i, lin in enumerate(linears) if (g := lin.gain())]
    heapq.heapify(heap)
    while heap:
        _, i, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this step does not fit; a cheaper one elsewhere may
        lin = linears[i]
        lin.units += 1
        spent += cost
        if g := lin.gain():
            heapq.heappush(heap, (-g[0], i, g[1]))


def _budget(config, bits: float) -> float:
    return bits * config.n_layers * sum(m * n for m, n in map(config.linear_shape, K.LINEARS))


def fisher_ranks(config, block_weights: Callable[[int], dict[str, torch.Tensor]],
                 preconditioners: list[LayerPreconditioners], bits: float) -> list[Ranks]:
    """Every block's path ranks by the greedy Fisher rule, spending at most `bits` per weight over the decoder
    linears (the same total `uniform` may spend). `block_weights(i)` gives block i's tensors by the sources' names
    (`attn_q.weight`, ...)."""
    linears = _estimates(config, block_weights, preconditioners, range(config.n_layers))
    _grow(linears, _budget(config, bits))
    ranks: list[Ranks] = [{} for _ in preconditioners]
    for lin in linears:
        ranks[lin.layer][lin.name] = split_rank(lin.units * lin.unit, lin.m, lin.n)
    return ranks


def last_block_ranks(config, block_weights: Callable[[int], dict[str, torch.Tensor]],
                     preconditioners: list[LayerPreconditioners], bits: float) -> list[Ranks]:
    """The uniform ranks in every block but the last, and the last block's linears grown by the Fisher rule into
    every bit the target leaves: the uniform ranks' rounding down, summed over the blocks."""
    uniform = block_ranks(config, bits)
    last = config.n_layers - 1
    others = last * sum(linear_bits(*config.linear_shape(lin), r) for lin, r in uniform.items())
    linears = _estimates(config, block_weights, preconditioners, range(last, last + 1))
    for lin in linears:  # never below the uniform ranks
        lin.units = max(1, sum(uniform[lin.name]) // lin.unit)
    _grow(linears, _budget(config, bits) - others)
    tail = {lin.name: split_rank(lin.units * lin.unit, lin.m, lin.n) for lin in linears}
    return [uniform] * last + [tail]


def allocate(rule: str, config, block_weights: Callable[[int], dict[str, torch.Tensor]],
             preconditioners: list[LayerPreconditioners], bits: float) -> list[Ranks]:
    """Each block's path ranks for `bits` by `rule` (one of ALLOCATIONS)."""
    if rule == "uniform":
        return [block_ranks(config, bits)] * config.n_layers
    if rule == "last-block":
        return last_block_ranks(config, block_weights, preconditioners, bits)
    return fisher_ranks(config, block_weights, preconditioners, bits)

