"""How the converter stores the embedding and the output head (spec/FORMAT.md §3.4, spec/CONVERTER.md, "Embedding and
head"): F16, Q8_0, Q4_0, IQ4_NL, or binary-factored by the same LB-ADMM as the decoder linears.

The choice is text, `f16`, `q8_0`, `q4_0`, `iq4_nl`, `q4_0+K` / `iq4_nl+K` (the K most frequent tokens' rows kept
at Q8_0, "hot rows"), `binary` (one path of rank min(V, d)), `binary:RANK` or `binary:RANKxPATHS` (residual paths),
kept in the recipe. A `StoredTable` holds what the file will hold: the bytes of a dense type (F16, Q8_0, Q4_0,
IQ4_NL, with or without hot rows), which the torch model sees as fixed float32 values, or a frozen
`BinaryFactoredLinear`, whose scales model reconstruction tunes like the decoder linears' scales (the file is then
exported from the tuned module). A 4-bit table's block scales are not tuned: tuned by distillation, they made
`quick`'s held-out perplexity 23% worse, left as stored it is 1.4% above F16's (spec/CONVERTER.md, "Embedding and
head").

Hot rows are the K tokens that occur most often in the whole calibration text (ties to the lower id): where a 4-bit
table loses, the loss sits in the frequent rows (spec/CONVERTER.md, "Embedding and head").

Weights for the choices that lose information (the 4-bit types' scale search, the ADMM's preconditioners):
- columns: the final norm's output second moments on the statistics windows, shrunk and square-rooted like the
  decoder linears' d_in. The head multiplies exactly that vector, so an error in column j costs in proportion to
  its size; for the embedding's own use (a row added to the residual stream) no better column weighting is known.
- rows (ADMM only): how often each token occurs in the calibration windows, shrunk the same way. An embedding row
  is read once per occurrence, and the gradient of the next-token loss at logit t has second moment ≈ the target
  frequency of t; the shrinkage keeps rare tokens from being ignored (a spurious logit on any row costs everywhere).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from nqfmt import HotRows, LinearPlan, ModelConfig
from nqfmt import keys as K
from nqfmt.errors import NQError
from nqfmt.layout import cold_ids
from nqfmt.q4 import BLOCK, GRIDS, dequantize_q4, pack_q4
from nqfmt.q8_0 import dequantize_q8_0

from .admm import AdmmSettings, lb_admm
from .factored import BinaryFactoredLinear, TrainablePath
from .preconditioners import ClippedSecondMoment, preconditioner

DENSE = {"f16": K.GGMLType.F16, "q8_0": K.GGMLType.Q8_0, "q4_0": K.GGMLType.Q4_0, "iq4_nl": K.GGMLType.IQ4_NL}
BINARY = "binary"
CHOICES = (*DENSE, BINARY)
HOT_BASES = ("q4_0", "iq4_nl")  # the types a table with hot rows keeps its other rows in


def hot_rows(choice: str) -> int:
    """How many hot rows a choice keeps at Q8_0 (`iq4_nl+K`: K; 0 for every other choice)."""
    base, plus, hot = choice.partition("+")
    return int(hot) if plus else 0


def base_type(choice: str) -> str:
    """The choice without its hot rows: `iq4_nl+4096` → `iq4_nl`."""
    return choice.partition("+")[0]


class EmbeddingChoiceError(NQError):
    """An --embedding value that is malformed or does not fit the model; the message says which and why."""


def parse_embedding(text: str) -> str:
    """The canonical form of an --embedding value (`q4_0`, `iq4_nl+4096`, `binary`, `binary:256`, `binary:576x2`,
    ...), or EmbeddingChoiceError."""
    base, plus, hot = text.strip().lower().partition("+")
    if plus:
        if base not in HOT_BASES or not hot.isdigit() or int(hot) < 1:
            raise EmbeddingChoiceError(f"--embedding {text!r}: hot rows go after q4_0 or iq4_nl as '+K', K a positive "
                                       f"number of rows")
        return f"{base}+{int(hot)}"
    kind, sep, spec = base.partition(":")
    if kind not in CHOICES or (sep and kind != BINARY):
        raise EmbeddingChoiceError(f"--embedding {text!r}: choose one of f16, q8_0, q4_0, iq4_nl, q4_0+K, iq4_nl+K, "
                                   f"binary, binary:RANK, binary:RANKxPATHS")
    if not sep:
        return kind
    rank, times, paths = spec.partition("x")
    if not rank.isdigit() or int(rank) < 1 or (times and (not paths.isdigit() or int(paths) < 1)):
        raise EmbeddingChoiceError(f"--embedding {text!r}: after 'binary:' a positive rank, optionally 'x' and a "
                                   f"positive number of paths")
    paths_text = f"x{int(paths)}" if times and int(paths) > 1 else ""
    return f"{BINARY}:{int(rank)}{paths_text}"


def binary_rank(choice: str, config: ModelConfig) -> int:
    """The rank of each path of a binary choice: the one given, or min(V, d)."""
    _, _, spec = choice.partition(":")
    rank = spec.partition("x")[0]
    return int(rank) if rank else min(config.vocab, config.hidden)


def binary_paths(choice: str) -> int:
    """How many binary paths a binary choice asks for (`binary:RANKxPATHS`; 1 otherwise)."""
    _, times, paths = choice.partition(":")[2].partition("x")
    return int(paths) if times else 1


def resolve_embedding(choice: str, config: ModelConfig, explicit: bool) -> str:
    """`choice` checked against the model, asked for explicitly (an error where it does not fit) or a preset's
    default (which falls back, and the recipe records what was used): a block type (Q8_0, Q4_0, IQ4_NL) needs d to
    be a multiple of 32, else f16; hot rows need a vocabulary larger than K, else every row is hot: q8_0."""
    if base_type(choice) in ("q8_0", "q4_0", "iq4_nl") and config.hidden % BLOCK:
        if explicit:
            raise EmbeddingChoiceError(f"--embedding {choice}: rows of {config.hidden} values are not whole blocks "
                                       f"of {BLOCK}; use f16 or binary")
        return "f16"
    if hot_rows(choice) >= config.vocab:
        if explicit:
            raise EmbeddingChoiceError(f"--embedding {choice}: {hot_rows(choice)} hot rows leave none of the "
                                       f"vocabulary of {config.vocab} to the 4-bit table")
        return "q8_0"
    if choice.startswith(BINARY):
        rank, top = binary_rank(choice, config), min(config.vocab, config.hidden)
        if rank > top:
            raise EmbeddingChoiceError(f"--embedding {choice}: rank {rank} is above min(vocabulary, hidden) = {top}")
        if binary_paths(choice) > K.MAX_PATHS:
            raise EmbeddingChoiceError(f"--embedding {choice}: at most {K.MAX_PATHS} paths")
    return choice


def table_bits(choice: str, config: ModelConfig) -> float:
    """Storage bits per table entry of a choice (spec/FORMAT.md §4)."""
    v, d = config.vocab, config.hidden
    if base_type(choice) in DENSE:
        block, size = K.TYPE_SIZES[DENSE[base_type(choice)]]
        hot, (hot_block, hot_size) = hot_rows(choice), K.TYPE_SIZES[K.HOT_ROWS_TYPE]
        return ((v - hot) * 8 * size / block + hot * (8 * hot_size / hot_block + 32 / d)) / v
    r = binary_rank(choice, config)
    return binary_paths(choice) * (r * (v + d) + 16 * (v + d)) / (v * d)


# --- what the file holds ------------------------------------------------------------------------------------------
@dataclass
class StoredTable:
    """One table as the file stores it: the bytes of a dense type (`raw`: F16, Q8_0, or 4-bit, of the other rows when
    the table has hot rows `hot_ids` with their Q8_0 bytes `hot_raw`), or a binary-factored `module` whose scales
    distillation tunes. The torch model sees a dense table as the fixed float32 values the file's reader forms."""

    gtype: K.GGMLType | None
    raw: np.ndarray | None = None
    hot_ids: np.ndarray | None = None
    hot_raw: np.ndarray | None = None
    module: BinaryFactoredLinear | None = None

    @property
    def kind(self) -> K.GGMLType | HotRows | LinearPlan:
        """The writer's table kind (spec §3.4)."""
        if self.module is not None:
            return self.module.plan()
        return self.gtype if self.hot_ids is None else HotRows(self.gtype, len(self.hot_ids))

    def torch_value(self) -> torch.Tensor | BinaryFactoredLinear:
        """What the torch model computes with: the module, or the table's values as float32 (V, d), each row where
        its token is."""
        if self.module is not None:
            return self.module
        values = _dequantized(self.gtype, self.raw)
        if self.hot_ids is None:
            return torch.from_numpy(values)
        vocab = len(self.raw) + len(self.hot_ids)
        out = np.empty((vocab, values.shape[1]), np.float32)
        out[cold_ids(self.hot_ids, vocab)] = values
        out[self.hot_ids] = dequantize_q8_0(self.hot_raw)
        return torch.from_numpy(out)

    def export(self, table: str) -> dict[str, np.ndarray]:
        """The table's tensors under their file names (a module's scales as they are now: round them first)."""
        if self.module is not None:
            return self.module.export_table(table)
        if self.hot_ids is None:
            return {K.dense_table_tensor(table): self.raw}
        return {K.dense_table_tensor(table): self.raw, K.hot_rows_tensor(table): self.hot_raw,
                K.hot_ids_tensor(table): self.hot_ids.astype(np.uint32)}

    def state(self) -> dict:
        """What a checkpoint needs to rebuild this table exactly (`from_state`)."""
        if self.module is None:
            extra = {} if self.hot_ids is None else {"hot_ids": self.hot_ids, "hot_raw": self.hot_raw}
            return {"gtype": int(self.gtype), "raw": self.raw, **extra}
        return {"paths": [{"u": u.to(torch.int8), "v": v.to(torch.int8), "scale_in": p.scale_in.detach().clone(),
                           "scale_out": p.scale_out.detach().clone()}
                          for p in self.module.paths for u, v in [p.signs()]]}

    @classmethod
    def from_state(cls, state: dict) -> "StoredTable":
        if "raw" in state:
            return cls(K.GGMLType(state["gtype"]), state["raw"], state.get("hot_ids"), state.get("hot_raw"))
        return cls(None, module=BinaryFactoredLinear([_frozen_path(p["u"].float(), p["v"].float(), p["scale_in"],
                                                                  p["scale_out"]) for p in state["paths"]]))


def _dequantized(gtype: K.GGMLType, raw: np.ndarray) -> np.ndarray:
    """A dense table's values as float32, formed as nqfmt's reader (and so load_nq and the runtime's reference)
    forms them."""
    if gtype == K.GGMLType.Q8_0:
        return dequantize_q8_0(raw)
    if gtype in K.Q4_TYPES:
        return dequantize_q4(raw, gtype)
    return raw.astype(np.float32)


def _frozen_path(u, v, scale_in, scale_out) -> TrainablePath:
    path = TrainablePath(u, v, scale_in, scale_out)
    path.freeze_signs()
    return path


# --- weights ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def column_weights(final_norm: Callable[[torch.Tensor], torch.Tensor], final_hidden: torch.Tensor,
                   gamma: float) -> torch.Tensor:
    """d (mean 1): the square root of the final norm output's clipped, shrunk second moments (module docstring)."""
    moments = ClippedSecondMoment()
    for window in final_hidden:
        moments.add(final_norm(window))
    return preconditioner(moments.mean(), gamma)


def row_weights(windows: torch.Tensor, vocab: int, gamma: float) -> torch.Tensor:
    """V (mean 1): the square root of each token's shrunk frequency in the calibration windows (module docstring)."""
    counts = torch.bincount(windows.reshape(-1), minlength=vocab)[:vocab].to(torch.float32)
    return preconditioner(counts / counts.sum(), gamma)


# --- the choices ----------------------------------------------------------------------------------------------------
Q4_STEPS = torch.arange(-9, 10, dtype=torch.float32) / 10  # offsets, in grid steps, of the point given to x_max
_HALF_UNITS = 160  # IQ4_NL: nearest grid value looked up per half grid unit over −160..160


def _nearest_lookup(gtype: K.GGMLType) -> torch.Tensor:
    grid = torch.from_numpy(GRIDS[gtype].astype(np.float32))
    half = torch.arange(-2 * _HALF_UNITS, 2 * _HALF_UNITS + 1, dtype=torch.float32) / 2
    return grid[(half[:, None] - grid).abs().argmin(-1)]


def _nearest(scaled: torch.Tensor, gtype: K.GGMLType, lookup: torch.Tensor | None) -> torch.Tensor:
    """The grid value nearest each of `scaled` (in grid units): Q4_0 rounds and clamps; IQ4_NL looks the value up per
    half unit (a value within a quarter unit of a midpoint may take the farther neighbour: its error is counted)."""
    if gtype == K.GGMLType.Q4_0:
        return scaled.round().clamp(-8, 7)
    return lookup[(2 * scaled).round().clamp(-2 * _HALF_UNITS, 2 * _HALF_UNITS).long() + 2 * _HALF_UNITS]


@torch.no_grad()
def quantize_q4(w: torch.Tensor, col_weight: torch.Tensor | None, gtype: K.GGMLType, chunk: int = 4096) -> np.ndarray:
    """Q4_0 or IQ4_NL bytes of w (V×d, d a multiple of 32) minimising the column-weighted squared error per block.

    Per block, candidate scales map the largest-magnitude value x_max to the grid's lowest point + δ or to its highest
    + δ (δ in −0.9..0.9 grid steps at that end); for each the values are rounded to the grid, the least-squares scale
    for those grid values is taken, and the candidate with the smallest weighted error wins (GGML's reference rule for
    Q4_0 is the δ = 0 member of the first family, without the refit). The winning scale is rounded to F16 and the
    values are rounded to the grid again for that scale."""
    v, d = w.shape
    grid = GRIDS[gtype].astype(np.float32)
    lookup = None if gtype == K.GGMLType.Q4_0 else _nearest_lookup(gtype)
    targets = torch.cat([float(grid[0]) + float(grid[1] - grid[0]) * Q4_STEPS,
                         float(grid[-1]) + float(grid[-1] - grid[-2]) * Q4_STEPS])
    weight = (torch.ones(d) if col_weight is None else col_weight).pow(2).reshape(1, d // BLOCK, BLOCK).float()
    index = torch.full((256,), -1, dtype=torch.uint8)
    index[torch.from_numpy(GRIDS[gtype].astype(np.int64)) + 128] = torch.arange(16, dtype=torch.uint8)
    out = []
    for start in range(0, v, chunk):
        x = w[start:start + chunk].to(torch.float32).reshape(-1, d // BLOCK, BLOCK)
        peak = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))  # the signed value of largest magnitude
        best_err = torch.full(peak.shape[:2], float("inf"))
        best_scale = torch.zeros(peak.shape[:2])
        for target in targets:
            inv = torch.where(peak != 0, target / peak, torch.zeros_like(peak))
            codes = _nearest(x * inv, gtype, lookup)
            num = (weight * x * codes).sum(-1)
            den = (weight * codes * codes).sum(-1)
            scale = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
            err = (weight * (x - scale[..., None] * codes).pow(2)).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
        d16 = best_scale.to(torch.float16)
        s = d16.to(torch.float32)[..., None]
        codes = _nearest(x / torch.where(s != 0, s, torch.ones_like(s)) * (s != 0), gtype, lookup)
        q = index[codes.to(torch.int64) + 128].reshape(x.shape[0], d)
        out.append(pack_q4(d16.numpy(), q.numpy()))
    return np.concatenate(out)


def factorize(w: torch.Tensor, rank: int, col_weight: torch.Tensor | None, row_weight: torch.Tensor | None,
              settings: AdmmSettings, seed: int, paths: int = 1) -> BinaryFactoredLinear:
    """A frozen binary factorization of w (V×d) by LB-ADMM with the given preconditioners (d_in: columns, d_out:
    rows): path 0 fits w, each further path what the earlier ones leave (residual binarization, as the decoder's
    residual paths; spec/FORMAT.md §3.1). The scales stay float32 until the pipeline rounds them for the file."""
    found, residual = [], w.detach().to(torch.float32)
    for p in range(paths):
        f = lb_admm(residual, rank, col_weight, row_weight, settings, seed + p)
        found.append(_frozen_path(f.u_latent, f.v_latent, f.scale_in, f.scale_out))
        residual = residual - found[-1].dense_weight().to(torch.float32)
    return BinaryFactoredLinear(found)


def hot_ids(counts: torch.Tensor, rows: int) -> np.ndarray:
    """The `rows` most frequent token ids by `counts` (V,), ties to the lower id, in increasing order."""
    order = torch.argsort(-counts.to(torch.int64), stable=True)
    return np.sort(order[:rows].numpy()).astype(np.int64)


def store_table(choice: str, w: torch.Tensor, config: ModelConfig, col_weight: torch.Tensor | None,
                row_weight: torch.Tensor | None, settings: AdmmSettings, seed: int,
                token_counts: torch.Tensor | None = None) -> StoredTable:
    """Table `w` (V×d, the source's values) stored as `choice` (already resolved against the model). A choice with
    hot rows takes them from `token_counts` (each token's count in the calibration text)."""
    if hot_rows(choice):
        gtype = DENSE[base_type(choice)]
        ids = hot_ids(token_counts, hot_rows(choice))
        cold = torch.from_numpy(cold_ids(ids, config.vocab))
        hot_raw = quantize(w[ids].detach().to(torch.float32).numpy(), GGMLQuantizationType.Q8_0)
        return StoredTable(gtype, quantize_q4(w[cold], col_weight, gtype), ids, hot_raw)
    if choice == "f16":
        return StoredTable(K.GGMLType.F16, w.detach().numpy().astype(np.float16))
    if choice == "q8_0":
        return StoredTable(K.GGMLType.Q8_0, quantize(w.detach().to(torch.float32).numpy(), GGMLQuantizationType.Q8_0))
    if choice in ("q4_0", "iq4_nl"):
        return StoredTable(DENSE[choice], quantize_q4(w, col_weight, DENSE[choice]))
    return StoredTable(None, module=factorize(w, binary_rank(choice, config), col_weight, row_weight, settings, seed,
                                              binary_paths(choice)))


def needs_statistics(choice: str) -> bool:
    """Whether storing `choice` uses the column (and row) weights: the lossy choices other than Q8_0."""
    return base_type(choice) in ("q4_0", "iq4_nl") or choice.startswith(BINARY)


@torch.no_grad()
def final_hidden(embed: Callable[[torch.Tensor], torch.Tensor], load_block: Callable[[int], torch.nn.Module],
                 n_layers: int, windows: torch.Tensor, batch: int, bf16: bool) -> torch.Tensor:
    """The full-precision model's last hidden states (before the final norm) on `windows`, one block at a time."""
    h = torch.cat([embed(windows[i:i + batch]) for i in range(0, windows.shape[0], batch)])
    for layer in range(n_layers):
        block = load_block(layer)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = torch.cat([block(h[i:i + batch]).float() for i in range(0, h.shape[0], batch)])
    return h
