"""The per-block stages (the paper's block reconstruction, spec/CONVERTER.md stage 3): error-propagation mitigation,
LB-ADMM initialisation, refinement with the STE, sign freezing.

Every stage trains against the full-precision block's outputs on the full-precision trajectory (the targets) while
feeding the block the *quantized* trajectory (the outputs of the already-quantized blocks before it), so each block
also absorbs the error its predecessors left. The loss is a channel-weighted MSE, weights from the output-gradient
second moments (preconditioners.py); the last `kl_blocks` blocks' is the KL of the next-token distributions instead,
read through the full-precision blocks after them and the head (`output_kl`). Randomness (batch order, ADMM init)
comes from generators seeded by (seed, layer, stage), so a resumed run replays exactly what an uninterrupted one
does.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nqfmt import keys as K
from nqfmt.bits import ranks_for_bits

from .admm import AdmmSettings, lb_admm
from .factored import BinaryFactoredLinear
from .preconditioners import LayerPreconditioners
from .torch_model import DecoderBlock
from .optim import Report, adam_cosine



@dataclass(frozen=True)
class TuneSettings:
    """One Adam(0.9, 0.99) + cosine phase over the calibration windows."""

    epochs: int
    batch: int = 4
    lr: float = 3e-2
    scale_lr: float = 2e-2  # relative: each scale vector's lr is this × its mean |value|


def stage_seed(seed: int, layer: int, stage: int) -> int:
    """A distinct, reproducible seed per (run seed, block, stage)."""
    return (seed * 1_000_003 + layer * 101 + stage) % (2 ** 63)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). There a bfloat16 matmul of a block's
    shapes runs several times faster than float32; elsewhere oneDNN emulates it, slower than float32, so the teacher
    stays float32 (also on a torch too old to say). Spec: CONVERTER.md, stage 3, "The teacher's precision"."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return False
    caps = capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def bf16_autocast(enabled: bool) -> torch.autocast:
    """The teacher's precision: bfloat16 matmuls with float32 reductions (autocast's policy) when enabled."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: torch.Tensor, batch: int, bf16: bool = False) -> torch.Tensor:
    """block(inputs) in float32, computed `batch` windows at a time; with `bf16`, the matmuls run in bfloat16.

    Only the full-precision teacher's forward passes use `bf16`: it barely moves the teacher's perplexity and halves
    their time, while bfloat16 in the tuned student costs quality (spec/CONVERTER.md, stage 3, "The teacher's
    precision", and "Tried and not adopted")."""
    with bf16_autocast(bf16):
        return torch.cat([block(inputs[i:i + batch]).float() for i in range(0, inputs.shape[0], batch)])


Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (block output, window indices) → loss


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over tokens and channels of w_c (ŷ − y)² (a mean, not the official sum, so one lr fits all sizes)."""
    return ((pred - target).pow(2) * weight).mean()


def channel_mse(targets: torch.Tensor, weight: torch.Tensor) -> Objective:
    """The block objective: the channel-weighted MSE to the full-precision block's outputs on the same windows."""
    return lambda pred, idx: weighted_mse(pred, targets[idx], weight)


def output_kl(readout: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
              bf16: bool = False) -> Objective:
    """KL(teacher ‖ student) of the next-token distributions over the whole vocabulary, both read out by `readout`
    (the full-precision blocks after this one, if any, then the final norm and head): the teacher's from the
    full-precision block outputs, the student's from the tuned block's. A late block's output reaches the logits
    through nothing but that readout, so there the loss the model is judged by can be computed exactly, where the
    channel weights only approximate it. With `bf16` both readouts run their matmuls in bfloat16 (the readout is
    frozen, like the teacher; the tuned block stays float32), which is faster and measured no worse
    (spec/CONVERTER.md, stage 3, "the last blocks' objective")."""
    def loss(pred: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with bf16_autocast(bf16):
            with torch.no_grad():
                logp_t = torch.log_softmax(readout(targets[idx]).float(), dim=-1)
            logp_s = torch.log_softmax(readout(pred).float(), dim=-1)
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean()
    return loss


def block_objective(layer: int, n_layers: int, targets: torch.Tensor, weight: torch.Tensor,
                    head: Callable[[torch.Tensor], torch.Tensor], fp_block: Callable[[int], nn.Module],
                    kl_blocks: int, bf16: bool) -> Objective:
    """The objective block `layer` tunes against: for the last `kl_blocks` blocks `output_kl` through the
    full-precision blocks after it (`fp_block(i)` builds block i) and the head, else the channel-weighted MSE
    (`weight` from preconditioners.py)."""
    if layer < n_layers - kl_blocks:
        return channel_mse(targets, weight)
    later = [fp_block(i) for i in range(layer + 1, n_layers)]

    def readout(h: torch.Tensor) -> torch.Tensor:
        for blk in later:
            h = blk(h)
        return head(h)
    return output_kl(readout, targets, bf16)


def tune(block: nn.Module, groups: list[dict], inputs: torch.Tensor, objective: Objective, settings: TuneSettings,
         seed: int, report: Report) -> float:
    """Minimise the objective of block(inputs) over the parameter groups; returns the last epoch's mean loss. Each
    group's lr follows its own cosine schedule from the group's `lr`."""
    if settings.epochs <= 0 or not groups:
        return float("nan")
    return adam_cosine(groups, inputs.shape[0], settings.batch, settings.epochs, seed,
                       lambda idx: objective(block(inputs[idx]), idx), report)


def mitigate_errors(block: DecoderBlock, inputs: torch.Tensor, objective: Objective, settings: TuneSettings,
                    seed: int, report: Report) -> float:
    """Error-propagation mitigation: tune the block's still-full-precision linear weights (not biases or norms) so
    that, fed the quantized trajectory, the block reproduces the full-precision outputs; the ADMM then factorizes
    these corrected weights."""
    params = [lin.weight for lin in block.linears.values() if isinstance(lin, nn.Linear)]
    for p in params:
        p.requires_grad_(True)
    try:
        return tune(block, [{"params": params, "lr": settings.lr}], inputs, objective, settings, seed, report)
    finally:
        for p in params:
            p.requires_grad_(False)


Ranks = dict[str, tuple[int, ...]]  # each decoder linear's path ranks in one block


def block_ranks(config, bits: float) -> Ranks:
    """Path ranks of each decoder linear for a bits target, the same in every block (spec/FORMAT.md §4)."""
    return {lin: ranks_for_bits(*config.linear_shape(lin), bits) for lin in K.LINEARS}


@torch.no_grad()
def factorize(block: DecoderBlock, ranks: Ranks, preconditioners: LayerPreconditioners, settings: AdmmSettings,
              seed: int, report: Callable[[int, int], None] = lambda i, n: None) -> None:
    """Replace every nn.Linear of the block by the LB-ADMM initialisation of its binary paths (bias kept): the first
    path factorizes the weight, each later one what the paths before it leave (residual binarization), all with the
    linear's preconditioners."""
    for i, name in enumerate(K.LINEARS):
        lin = block.linears[name]
        residual = lin.weight.detach().to(torch.float32)
        factored = None
        for p, rank in enumerate(ranks[name]):
            f = lb_admm(residual, rank, preconditioners.d_in[name], preconditioners.d_out[name], settings,
                        seed=stage_seed(seed, block.layer, 10 + i + 100 * p))
            if factored is None:
                bias = None if lin.bias is None else lin.bias.detach()
                factored = BinaryFactoredLinear.from_factors(f.u_latent, f.v_latent, f.scale_in, f.scale_out,
                                                             bias=bias)
            else:
                factored.add_path(f.u_latent, f.v_latent, f.scale_in, f.scale_out)
            residual = residual - f.deployed()
        block.linears[name] = factored
        report(i + 1, len(K.LINEARS))


def factored_linears(block: DecoderBlock) -> list[BinaryFactoredLinear]:
    return [lin for lin in block.linears.values() if isinstance(lin, BinaryFactoredLinear)]


def refine(block: DecoderBlock, inputs: torch.Tensor, objective: Objective, settings: TuneSettings, seed: int,
           report: Report) -> float:
    """Tune latents (STE) and scales of all the block's factored linears jointly; norms and biases stay fixed."""
    linears = factored_linears(block)
    groups = [{"params": [p for lin in linears for p in lin.latents()], "lr": settings.lr}]
    groups += [{"params": [s], "lr": settings.scale_lr * float(s.detach().abs().mean())}
               for lin in linears for s in lin.scales()]
    return tune(block, groups, inputs, objective, settings, seed, report)


def freeze(block: DecoderBlock) -> None:
    """Signs become ±1 buffers; from here on only the scales can change (model reconstruction)."""
    for lin in factored_linears(block):
        lin.freeze_signs()
