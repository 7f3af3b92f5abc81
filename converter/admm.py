"""LB-ADMM: initial binary factors of one weight matrix, W ≈ diag(scale_out)·U·V·diag(scale_in), U, V ∈ {±1}.

The paper's LB-ADMM (scheduled penalty ρ, ridge λ, SVID projection, scaled duals), with three deliberate
departures from the official code, each because the official choice loses accuracy on a CPU in float32:
- the whole state is float32 (the official one is BF16) and the SVID power iteration starts from ones, not a random
  vector (|M| is non-negative, so its Perron vector is positive and ones converges to it; no RNG needed);
- scale extraction fits the *deployed* matrix: after the signs are fixed, scale_out and scale_in are refit by a few
  sweeps of weighted alternating least squares on diag(d_out)·(W − Ŵ)·diag(d_in), instead of the official mean
  magnitude of the continuous factors (which discards the per-rank magnitudes and the preconditioner weighting);
- magnitude balancing is applied to the two scale vectors (equal RMS), leaving the product unchanged, so one relative
  learning rate suits both in the refinement that follows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-12


@dataclass(frozen=True)
class AdmmSettings:
    """Knobs of one factorization; defaults are the official code's (λ = 3e-2, linear ρ, 5 power iterations)."""

    iterations: int = 100
    ridge: float = 3e-2
    schedule: str = "linear"
    power_iterations: int = 5
    scale_sweeps: int = 4


SCHEDULES = {
    "linear": lambda t: t,
    "cubic": lambda t: t ** 3,
    "constant": lambda t: 1.0,
}


@dataclass
class Factorization:
    """Binary factors of one m×n matrix: real latents (their sign is the factor; mean |latent| = 1) and scales."""

    u_latent: torch.Tensor  # m×r
    v_latent: torch.Tensor  # r×n
    scale_in: torch.Tensor  # n
    scale_out: torch.Tensor  # m

    def deployed(self) -> torch.Tensor:
        """The matrix the file will hold: diag(scale_out)·sign(U)·sign(V)·diag(scale_in) (sign(0) = +1)."""
        return self.scale_out[:, None] * (sign(self.u_latent) @ sign(self.v_latent)) * self.scale_in[None, :]


_ONE = torch.ones(())


def sign(x: torch.Tensor) -> torch.Tensor:
    """±1 float32 with sign(0) = +1 for either zero, the file's convention. Adding +0.0 turns −0.0 into +0.0, so one
    copysign gives the convention, much faster than torch.where with scalars, which matters because the refinement
    takes the sign of every latent at every step."""
    return torch.copysign(_ONE, x + 0.0).to(torch.float32)


def svid(m: torch.Tensor, power_iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign-value-independent decomposition: sign(M) ⊙ (a bᵀ) with a bᵀ the top rank-1 approximation of |M|.

    Returns (projection, a, b). The last step sets b = |M|ᵀa with ‖a‖ = 1, the exact least-squares b for that a.
    """
    mag = m.abs()
    b = torch.ones(mag.shape[1], dtype=mag.dtype)
    a = mag @ b
    for _ in range(power_iterations):
        a = mag @ b
        a = a / a.norm().clamp_min(EPS)
        b = mag.T @ a
    return sign(m) * torch.outer(a, b), a, b


def _ridge_solve(gram: torch.Tensor, shift: float, rhs: torch.Tensor) -> torch.Tensor:
    """Solve (G + shift·I) X = rhs for symmetric positive definite G + shift·I (Cholesky; LU if that fails)."""
    g = gram + shift * torch.eye(gram.shape[0], dtype=gram.dtype)
    g = (g + g.T) / 2
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.solve(g, rhs)


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=0, keepdim=True).clamp_min(EPS)


def balance(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(η·left, right/η) with η chosen so both have the same RMS; any product left ⊗ right is unchanged."""
    rms_l = left.pow(2).mean().sqrt().clamp_min(EPS)
    rms_r = right.pow(2).mean().sqrt().clamp_min(EPS)
    eta = (rms_r / rms_l).sqrt()
    return left * eta, right / eta


def fit_scales(w: torch.Tensor, product: torch.Tensor, scale_out: torch.Tensor, scale_in: torch.Tensor,
               d_out: torch.Tensor, d_in: torch.Tensor, sweeps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted ALS for min Σ d_out_i² d_in_j² (W_ij − s_out_i P_ij s_in_j)² over the two scale vectors, P = U·V.

    Each half-step is the exact minimiser for one vector given the other (rows are independent), so the error never
    rises. Rows or columns where P is all zero keep their previous scale.
    """
    p_in, p_out = d_in.pow(2), d_out.pow(2)
    wp, pp = w * product, product * product
    for _ in range(sweeps):
        num = (wp * (p_in * scale_in)[None, :]).sum(1)
        den = (pp * (p_in * scale_in.pow(2))[None, :]).sum(1)
        scale_out = torch.where(den > EPS, num / den.clamp_min(EPS), scale_out)
        num = (wp * (p_out * scale_out)[:, None]).sum(0)
        den = (pp * (p_out * scale_out.pow(2))[:, None]).sum(0)
        scale_in = torch.where(den > EPS, num / den.clamp_min(EPS), scale_in)
    return scale_out, scale_in


def weighted_error(w: torch.Tensor, approx: torch.Tensor, d_in: torch.Tensor, d_out: torch.Tensor) -> float:
    """‖diag(d_out)(W − Ŵ)diag(d_in)‖²_F / ‖diag(d_out) W diag(d_in)‖²_F."""
    wt = d_out[:, None] * d_in[None, :]
    return float(((w - approx) * wt).pow(2).sum() / (w * wt).pow(2).sum().clamp_min(EPS))


def lb_admm(w: torch.Tensor, rank: int, d_in: torch.Tensor | None = None, d_out: torch.Tensor | None = None,
            settings: AdmmSettings = AdmmSettings(), seed: int = 0) -> Factorization:
    """Binary factors of W (m×n) at `rank`, preconditioned by the diagonal Fisher factors d_in (n) and d_out (m).

    ADMM on W̃ = diag(d_out)·W·diag(d_in) with A (m×r), B (r×n), their SVID projections Z and scaled duals Λ; the
    penalty ρ rises along `settings.schedule` from 0 to ~1 and the ridge λ keeps the r×r solves well conditioned.
    """
    w = w.detach().to(torch.float32)
    m, n = w.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} outside 1..{min(m, n)} for a {m}×{n} matrix")
    if settings.schedule not in SCHEDULES:
        raise ValueError(f"unknown penalty schedule {settings.schedule!r} (known: {', '.join(SCHEDULES)})")
    d_in = torch.ones(n) if d_in is None else d_in.detach().to(torch.float32).clamp_min(EPS)
    d_out = torch.ones(m) if d_out is None else d_out.detach().to(torch.float32).clamp_min(EPS)
    wt = d_out[:, None] * w * d_in[None, :]
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, rank, generator=gen)
    b = torch.randn(rank, n, generator=gen)
    za, _, _ = svid(a, settings.power_iterations)
    zb, _, _ = svid(b, settings.power_iterations)
    dual_a, dual_b = a - za, b - zb
    sched = SCHEDULES[settings.schedule]
    for k in range(settings.iterations):
        rho = float(sched(k / settings.iterations))
        x = _unit_columns(zb.T)
        a = _ridge_solve(x.T @ x, rho + settings.ridge, x.T @ wt.T + rho * (za - dual_a).T).T
        y = _unit_columns(za)
        b = _ridge_solve(y.T @ y, rho + settings.ridge, y.T @ wt + rho * (zb - dual_b))
        za, a_mag_out, _ = svid(a + dual_a, settings.power_iterations)
        zb, _, b_mag_in = svid(b + dual_b, settings.power_iterations)
        dual_a = dual_a + a - za
        dual_b = dual_b + b - zb
    latent_u = (a + dual_a) / d_out[:, None]
    latent_v = (b + dual_b) / d_in[None, :]
    if settings.iterations == 0:
        _, a_mag_out, _ = svid(latent_u, settings.power_iterations)
        _, _, b_mag_in = svid(latent_v, settings.power_iterations)
    product = sign(latent_u) @ sign(latent_v)
    scale_out, scale_in = fit_scales(w, product, a_mag_out / d_out, b_mag_in / d_in, d_out, d_in,
                                     settings.scale_sweeps)
    scale_out, scale_in = balance(scale_out, scale_in)
    return Factorization(latent_u / latent_u.abs().mean().clamp_min(EPS),
                         latent_v / latent_v.abs().mean().clamp_min(EPS), scale_in, scale_out)
