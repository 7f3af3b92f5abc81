"""`BinaryFactoredLinear`: a linear layer W ≈ Σ_p diag(scale_out)·U·diag(scale_mid)·V·diag(scale_in), trainable.

While the signs are being tuned, U and V are real latents whose sign is taken in the forward pass and whose gradient
passes straight through (identity backward); once frozen they are ±1 buffers and only the scales train. `export`
gives exactly the arrays nqfmt writes, so a model rebuilt from the file (`model.load_nq`) computes the same numbers.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from nqfmt import LinearPlan, pack_signs
from nqfmt import keys as K

from .admm import sign


class _SignSTE(torch.autograd.Function):
    """sign(x) with sign(0) = +1 in the forward pass, the identity in the backward pass (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _vector(x, length: int, what: str) -> nn.Parameter:
    """A float32 copy of a scale vector (tensor, array or list) as a trainable parameter, its length checked."""
    t = torch.as_tensor(x).detach().to(torch.float32).clone()
    if t.shape != (length,):
        raise ValueError(f"{what}: expected shape ({length},), got {tuple(t.shape)}")
    return nn.Parameter(t)


class TrainablePath(nn.Module):
    """One binary path: output-side signs U (m×r), input-side signs V (r×n), and its scale vectors.

    `u`, `v` are latents (copied; their sign is what counts) unless `frozen`, in which case they must already be ±1
    float32 and become the frozen sign buffers as they are (no copy: a whole model's signs are large).
    """

    def __init__(self, u: torch.Tensor, v: torch.Tensor, scale_in, scale_out, scale_mid=None,
                 frozen: bool = False) -> None:
        super().__init__()
        u, v = (torch.as_tensor(t).detach().to(torch.float32) for t in (u, v))
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(f"U {tuple(u.shape)} and V {tuple(v.shape)} are not m×r and r×n")
        self.m, self.rank = u.shape
        self.n = v.shape[1]
        if frozen:
            self.register_buffer("latent_u", u)
            self.register_buffer("latent_v", v)
        else:
            self.latent_u = nn.Parameter(u.clone())
            self.latent_v = nn.Parameter(v.clone())
        self.scale_in = _vector(scale_in, self.n, "scale_in")
        self.scale_out = _vector(scale_out, self.m, "scale_out")
        self.scale_mid = None if scale_mid is None else _vector(scale_mid, self.rank, "scale_mid")
        self.signs_frozen = frozen

    def signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sign(U), sign(V)); differentiable into the latents (STE) until frozen."""
        if self.signs_frozen:
            return self.latent_u, self.latent_v
        return _SignSTE.apply(self.latent_u), _SignSTE.apply(self.latent_v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.signs()
        t = torch.nn.functional.linear(x * self.scale_in, v)
        if self.scale_mid is not None:
            t = t * self.scale_mid
        return torch.nn.functional.linear(t, u) * self.scale_out

    def freeze_signs(self) -> None:
        """Replace the latents by ±1 buffers (same names), so only the scales remain trainable."""
        if self.signs_frozen:
            return
        u, v = sign(self.latent_u.detach()), sign(self.latent_v.detach())
        del self.latent_u, self.latent_v
        self.register_buffer("latent_u", u)
        self.register_buffer("latent_v", v)
        self.signs_frozen = True

    def scales(self) -> list[nn.Parameter]:
        return [s for s in (self.scale_in, self.scale_out, self.scale_mid) if s is not None]

    def dense_weight(self) -> torch.Tensor:
        """The m×n matrix this path applies, in float64 (so summing paths rounds only once)."""
        u, v = (s.detach().double() for s in self.signs())
        mid = (self.scale_mid.detach().double() if self.scale_mid is not None
               else torch.ones(self.rank, dtype=torch.float64))
        return self.scale_out.detach().double()[:, None] * ((u * mid) @ v) * self.scale_in.detach().double()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of this path's matrix, [..., n], without building the whole matrix (a factored embedding)."""
        u, v = self.signs()
        t = u[ids]
        if self.scale_mid is not None:
            t = t * self.scale_mid
        return (t @ v) * self.scale_out[ids][..., None] * self.scale_in

    def export(self, name: Callable[[str], str]) -> dict[str, np.ndarray]:
        """Packed signs (uint32) and float16 scales under the file names `name(part)` gives, in file order."""
        u, v = (s.detach().numpy() for s in self.signs())
        out = {name(K.V_SIGNS): pack_signs(v), name(K.U_SIGNS): pack_signs(u),
               name(K.SCALE_IN): self.scale_in.detach().numpy().astype(np.float16),
               name(K.SCALE_OUT): self.scale_out.detach().numpy().astype(np.float16)}
        if self.scale_mid is not None:
            out[name(K.SCALE_MID)] = self.scale_mid.detach().numpy().astype(np.float16)
        return out


class BinaryFactoredLinear(nn.Module):
    """y = bias + Σ_p scale_out ⊙ (sign(U_p) @ (scale_mid ⊙ (sign(V_p) @ (scale_in ⊙ x)))), for x [..., n].

    Paths are kept in `paths` (path 0 first); the optional bias is a frozen float32 buffer, as nqfmt stores it.
    """

    def __init__(self, paths: Sequence[TrainablePath], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not paths:
            raise ValueError("a BinaryFactoredLinear needs at least one path")
        self.m, self.n = paths[0].m, paths[0].n
        for p in paths:
            if (p.m, p.n) != (self.m, self.n):
                raise ValueError(f"path of shape {p.m}×{p.n} in a {self.m}×{self.n} linear")
            if (p.scale_mid is None) != (paths[0].scale_mid is None):
                raise ValueError("either every path carries scale_mid or none does")
        self.paths = nn.ModuleList(paths)
        if bias is not None:
            bias = torch.as_tensor(bias).detach().to(torch.float32).clone()
            if bias.shape != (self.m,):
                raise ValueError(f"bias: expected shape ({self.m},), got {tuple(bias.shape)}")
        self.register_buffer("bias", bias)

    @classmethod
    def from_factors(cls, u, v, scale_in, scale_out, scale_mid=None, bias=None) -> "BinaryFactoredLinear":
        """One-path linear from U (m×r) and V (r×n): ±1 signs or real latents (their sign is what counts)."""
        return cls([TrainablePath(u, v, scale_in, scale_out, scale_mid)], bias)

    def add_path(self, u, v, scale_in, scale_out, scale_mid=None) -> "BinaryFactoredLinear":
        """Append a residual path (it must match the others' shape and scale_mid presence)."""
        path = TrainablePath(u, v, scale_in, scale_out, scale_mid)
        if (path.m, path.n) != (self.m, self.n) or (path.scale_mid is None) != (self.paths[0].scale_mid is None):
            raise ValueError(f"path {path.m}×{path.n} (scale_mid: {path.scale_mid is not None}) does not fit this "
                             f"{self.m}×{self.n} linear")
        self.paths.append(path)
        return self

    @property
    def signs_frozen(self) -> bool:
        return all(p.signs_frozen for p in self.paths)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(p.rank for p in self.paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.paths[0](x)
        for p in self.paths[1:]:
            y = y + p(x)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the matrix applied (bias excluded), [..., n]: the lookup of a binary-factored embedding."""
        y = self.paths[0].rows(ids)
        for p in self.paths[1:]:
            y = y + p.rows(ids)
        return y

    def freeze_signs(self) -> None:
        """Latents become ±1 buffers; afterwards only the scales are trainable."""
        for p in self.paths:
            p.freeze_signs()

    def latents(self) -> list[nn.Parameter]:
        """The trainable sign latents (empty once frozen)."""
        return [t for p in self.paths if not p.signs_frozen for t in (p.latent_u, p.latent_v)]

    def scales(self) -> list[nn.Parameter]:
        return [s for p in self.paths for s in p.scales()]

    @torch.no_grad()
    def round_scales_to_fp16(self) -> None:
        """Round every scale to the nearest float16, so this module computes exactly what the file will hold."""
        for s in self.scales():
            s.copy_(s.to(torch.float16).to(torch.float32))

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The m×n matrix applied (bias excluded), float32; for tests and analysis, not for the forward pass."""
        w = self.paths[0].dense_weight()
        for p in self.paths[1:]:
            w = w + p.dense_weight()
        return w.to(torch.float32)

    def plan(self) -> LinearPlan:
        return LinearPlan(self.ranks, self.paths[0].scale_mid is not None)

    @torch.no_grad()
    def export(self, layer: int, linear: str) -> dict[str, np.ndarray]:
        """Every tensor of this linear in nqfmt's names, dtypes, shapes and order (paths, then the bias)."""
        out: dict[str, np.ndarray] = {}
        for i, p in enumerate(self.paths):
            out.update(p.export(lambda part: K.path_tensor(layer, linear, i, part)))
        if self.bias is not None:
            out[K.bias_tensor(layer, linear)] = self.bias.numpy().astype(np.float32)
        return out

    @torch.no_grad()
    def export_table(self, table: str) -> dict[str, np.ndarray]:
        """This matrix as a binary-factored embedding / head (`table` = K.EMBD_TABLE or K.OUTPUT_TABLE; no bias)."""
        out: dict[str, np.ndarray] = {}
        for i, p in enumerate(self.paths):
            out.update(p.export(lambda part: K.table_path_tensor(table, i, part)))
        return out
