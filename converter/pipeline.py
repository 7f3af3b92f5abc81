"""The conversion pipeline: calibration → preconditioners → per block (mitigation, ADMM, refinement, freeze) →
model reconstruction → `.nq` file, with presets, per-block checkpoints and progress reporting.

Memory: one full-precision block at a time (built from the source's lazily loaded tensors), the calibration hidden
states at the current block boundary (full-precision and quantized trajectories), the quantized blocks (±1 signs)
and the teacher's top-k cache — never a second copy of the whole model.

Checkpoints live in `OUT.work/` beside OUT (converter/workdir.py: safetensors + JSON, marked with the run's
fingerprint): the preconditioners, every finished block's factors, the two boundary activation sets after the last
finished block, the teacher cache, the stored tables and the reconstructed scales. Every random choice
is drawn from a generator seeded by (seed, block, stage), and the final model is always assembled from the saved
block files, so `--resume` after a kill writes the same bytes as an uninterrupted run (apart from the date). The work
directory is removed once OUT is committed.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import resource
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from nqfmt import NQWriter, Provenance
from nqfmt.writer import WrittenInterrupt
from nqfmt import keys as K
from nqfmt.bits import linear_bits
from nqfmt.errors import NQError, one_line

from . import block_reconstruction as B
from . import embedding as E
from .admm import AdmmSettings
from .allocation import ALLOCATIONS, allocate
from .calibration import (
    CalibrationError,
    calibration_tokens,
    default_calibration_texts,
    draw_windows,
    windows_sha256,
)
from .factored import BinaryFactoredLinear, TrainablePath
from .model_reconstruction import (
    TOP_K,
    TeacherCache,
    reconstruct,
    scale_parameters,
    teacher_cache,
)
from .preconditioners import LayerPreconditioners, collect_preconditioners
from .progress import Reporter, SilentReporter
from .sources import Source, open_source
from .torch_model import DecoderBlock, TorchModel
from .workdir import WorkDir, WorkDirError, check_ours

T = TypeVar("T")

CONVERTER_VERSION = "0.1.0"
MIN_BITS = 0.5
MAX_SEED = 2**63 - 1  # seeds feed torch generators (and stage_seed's arithmetic modulo 2^63)
MAX_BITS = 4.0


class ConversionError(NQError):
    """A conversion cannot start or continue; the message is one line saying why."""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the numbers in the file (goes into its provenance as JSON)."""

    samples: int
    seqlen: int
    stat_samples: int
    shrinkage: float
    admm: AdmmSettings
    mitigation: B.TuneSettings
    refinement: B.TuneSettings
    recon_samples: int
    recon_epochs: float  # passes over the distillation windows; a fraction is a last partial pass
    recon_batch: int
    recon_lr: float
    teacher_bf16: bool = False  # the full-precision targets and teacher cache in bfloat16 (where the CPU has it)
    top_k: int = TOP_K
    recon_ce: float = 0.0  # weight of the calibration text's next-token cross-entropy beside the distillation's KL
    kl_blocks: int = 0  # the last kl_blocks blocks tune against the next-token distribution (block.output_kl)
    error_mitigation: bool = True
    refine: bool = True
    model_recon: bool = True
    forward_batch: int = 8
    embedding: str = "f16"  # how the embedding and head are stored: converter/embedding.py
    allocation: str = "uniform"  # how ranks are spread over the linears: converter/allocation.py

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def windows(self) -> int:
        """Calibration windows to draw: the block stage tunes on the first `samples`; distillation may use more
        distinct windows (distinct windows beat passes over the same ones: spec/CONVERTER.md, stage 4), whose
        full-precision trajectory is carried through the blocks as the teacher's input."""
        return max(self.samples, self.recon_samples) if self.model_recon else self.samples

    def distilled(self, rows: torch.Tensor) -> torch.Tensor:
        """The distillation's rows of anything indexed like the drawn windows: the first `recon_samples`."""
        return rows[:self.recon_samples]


# The two recipes, each the best measured within its time budget on a 2-core CPU for SmolLM2-135M (quick: 30 min,
# standard: 2 h). Why each setting has its value, and what was tried instead: spec/CONVERTER.md, "Presets".
PRESETS: dict[str, Recipe] = {
    "quick": Recipe(samples=128, seqlen=256, stat_samples=32, shrinkage=0.4, admm=AdmmSettings(iterations=60),
                    mitigation=B.TuneSettings(epochs=1, batch=4, lr=1e-4, scale_lr=0.0),
                    refinement=B.TuneSettings(epochs=4, batch=2, lr=3e-2, scale_lr=2e-2),
                    recon_samples=768, recon_epochs=1, recon_batch=1, recon_lr=5e-3, recon_ce=1.0, teacher_bf16=True,
                    embedding="iq4_nl+3072", allocation="last-block"),
    "standard": Recipe(samples=512, seqlen=256, stat_samples=64, shrinkage=0.4, admm=AdmmSettings(iterations=100),
                       mitigation=B.TuneSettings(epochs=1, batch=4, lr=1e-4, scale_lr=0.0),
                       refinement=B.TuneSettings(epochs=3, batch=2, lr=3e-2, scale_lr=2e-2),
                       recon_samples=2000, recon_epochs=1, recon_batch=1, recon_lr=5e-3, recon_ce=1.0,
                       teacher_bf16=True, kl_blocks=2, top_k=512,
                       embedding="iq4_nl+3072", allocation="last-block"),
}


@dataclass
class Options:
    """What the command line asks for."""

    model: str
    out: Path
    bits: float = 1.0
    preset: str = "quick"
    calib: Sequence[Path] = ()
    samples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    threads: int | None = None
    resume: bool = False
    error_mitigation: bool = True
    refine: bool = True
    model_recon: bool = True
    embedding: str | None = None  # None: the preset's
    allocation: str | None = None  # None: the preset's
    kl_blocks: int | None = None  # None: the preset's
    recon_samples: int | None = None  # distillation windows; None: the preset's

    def recipe(self) -> Recipe:
        if self.preset not in PRESETS:
            raise ConversionError(f"unknown preset {self.preset!r} (choose from: {', '.join(PRESETS)})")
        r = PRESETS[self.preset]
        over = dict(error_mitigation=self.error_mitigation, refine=self.refine, model_recon=self.model_recon,
                    teacher_bf16=r.teacher_bf16 and B.native_bf16())
        if self.samples is not None:
            if self.samples < 1:
                raise ConversionError(f"--samples must be at least 1, got {self.samples}")
            over["samples"] = self.samples
            over["stat_samples"] = min(r.stat_samples, self.samples)
            over["recon_samples"] = max(1, round(r.recon_samples * self.samples / r.samples))
        if self.seqlen is not None:
            over["seqlen"] = self.seqlen
        if self.embedding is not None:
            over["embedding"] = E.parse_embedding(self.embedding)
        if self.allocation is not None:
            if self.allocation not in ALLOCATIONS:
                raise ConversionError(f"unknown allocation {self.allocation!r} (choose from: {', '.join(ALLOCATIONS)})")
            over["allocation"] = self.allocation
        if self.recon_samples is not None:
            if self.recon_samples < 1:
                raise ConversionError(f"recon_samples must be at least 1, got {self.recon_samples}")
            over["recon_samples"] = self.recon_samples
        if self.kl_blocks is not None:
            if self.kl_blocks < 0:
                raise ConversionError(f"kl_blocks must be at least 0, got {self.kl_blocks}")
            over["kl_blocks"] = self.kl_blocks
        return dataclasses.replace(r, **over)


@dataclass
class Summary:
    """What the end-of-run table shows (and bench scripts record)."""

    out: Path
    bits_target: float
    bpw_linears: float
    bpw_file: float
    file_bytes: int
    fp16_bytes: int
    stage_seconds: dict[str, float]
    peak_rss_mb: float
    model: TorchModel | None = field(default=None, repr=False)  # the quantized model, equal to what OUT holds

    @property
    def ratio_to_fp16(self) -> float:
        return self.fp16_bytes / self.file_bytes


def check_bits(bits: float) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConversionError(f"--bits {bits:g} is outside {MIN_BITS:g}..{MAX_BITS:g} (above one path's maximum, "
                              f"a linear carries residual paths)")


def check_output(out: Path) -> None:
    """Refuse, before any work is done, an OUT whose directory is missing or read-only, or that (or its OUT.partial)
    exists as anything but a regular file: a directory, a device, a FIFO (the atomic rename would replace it), or
    whose OUT.work exists without the converter's mark (it would be neither resumed nor deleted)."""
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ConversionError(f"cannot write {out}: it is a directory")
    for path in (out, out.with_name(out.name + ".partial")):
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):
            raise ConversionError(f"cannot write {out}: {path} exists and is not a regular file")
    if not parent.is_dir():
        raise ConversionError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConversionError(f"cannot write {out}: directory {parent} is not writable")
    check_ours(out)


def check_inputs(out: Path, source: Path, calib: Sequence[Path]) -> None:
    """Refuse an OUT that would overwrite what the conversion reads: OUT, OUT.partial or OUT.work being (or lying
    inside) the source file or directory, or being a calibration file (also through links)."""
    written = [out.with_name(out.name + suffix) for suffix in ("", ".partial", ".work")]
    inputs = [source, *(source.iterdir() if source.is_dir() else ()), *map(Path, calib)]
    for path in written:
        if source.is_dir() and path.resolve().is_relative_to(source.resolve()):
            raise ConversionError(f"cannot write {out}: it lies inside the source directory {source}")
        for given in inputs:
            if path.exists() and given.exists() and os.path.samefile(path, given):
                what = "a calibration file" if given in map(Path, calib) else "a source file"
                raise ConversionError(f"cannot write {out}: {path} is {what} ({given})")


def check_settings(options: Options) -> None:
    """Settings the command line accepts but no run can use: the seed's range, the thread count (at most the cores
    this process may run on), missing calibration files. Sets torch's thread count."""
    if not 0 <= options.seed <= MAX_SEED:
        raise ConversionError(f"--seed {options.seed} is outside 0..{MAX_SEED} (2^63 - 1)")
    for path in options.calib:
        if not Path(path).is_file():
            raise CalibrationError(f"calibration text {path} does not exist or is not a file")
    if options.threads is not None:
        cores = available_cores()
        if not 1 <= options.threads <= cores:
            raise ConversionError(f"--threads {options.threads}: this machine allows 1 to {cores}")
        torch.set_num_threads(options.threads)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or taskset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def linear_bpw(config, ranks: list[B.Ranks]) -> float:
    """Bits per weight over the decoder linears, the paper's way (signs + 16-bit scales of every path; bias not
    counted), from each block's path ranks."""
    bits = sum(linear_bits(*config.linear_shape(lin), r) for block in ranks for lin, r in block.items())
    return bits / (len(ranks) * sum(m * n for m, n in map(config.linear_shape, K.LINEARS)))


def now_utc() -> str:
    """The conversion date (the only run-dependent metadata in the file)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- checkpoints ----------------------------------------------------------------------------------------------------

def block_state(block: DecoderBlock) -> dict[str, dict]:
    """Frozen factors of a finished block, every path of every linear: signs as int8, scales float32 (scale_mid
    where the path has one), and the bias."""
    state = {}
    for name, lin in block.linears.items():
        paths = []
        for p in lin.paths:
            u, v = p.signs()
            paths.append({"u": u.to(torch.int8), "v": v.to(torch.int8), "scale_in": p.scale_in.detach().clone(),
                          "scale_out": p.scale_out.detach().clone(),
                          "scale_mid": None if p.scale_mid is None else p.scale_mid.detach().clone()})
        state[name] = {"paths": paths, "bias": None if lin.bias is None else lin.bias.clone()}
    return state


def quantized_block(config, layer: int, norms: dict[str, torch.Tensor], state: dict) -> DecoderBlock:
    """A block of frozen BinaryFactoredLinears rebuilt from `block_state` (what the resumed run rebuilds too);
    ValueError when the state does not describe this config's linears."""
    if not isinstance(state, dict) or sorted(state) != sorted(K.LINEARS):
        raise ValueError(f"block {layer} holds linears {sorted(state) if isinstance(state, dict) else state!r}")
    linears = {}
    for name, s in state.items():
        paths = [TrainablePath(_signs(p["u"]), _signs(p["v"]), p["scale_in"], p["scale_out"], p["scale_mid"],
                               frozen=True) for p in s["paths"]]
        lin = BinaryFactoredLinear(paths, s["bias"])
        if (lin.m, lin.n) != config.linear_shape(name):
            raise ValueError(f"{name} of block {layer} is {lin.m}x{lin.n}, the config says "
                             f"{'x'.join(map(str, config.linear_shape(name)))}")
        linears[name] = lin
    return DecoderBlock(config, layer, norms, linears)


def _signs(t: torch.Tensor) -> torch.Tensor:
    """Saved int8 signs as the ±1 float32 buffer a frozen path holds."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or not bool(((t == 1) | (t == -1)).all()):
        raise ValueError("signs must be an int8 tensor of ±1")
    return t.float()


def restored(work: WorkDir, name: str, build: Callable[[object], T]) -> T:
    """`build(checkpoint)`: a checkpoint whose structure or shapes do not fit this run is refused in one line."""
    try:
        return build(work.load(name))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise WorkDirError(f"{work.file(name)}: checkpoint does not fit this run ({one_line(e)}); run again "
                           f"without --resume") from e


def saved_preconditioners(config, state: list) -> list[LayerPreconditioners]:
    """The preconditioners checkpoint, each vector checked against the linear it belongs to."""
    if len(state) != config.n_layers:
        raise ValueError(f"{len(state)} blocks of preconditioners for {config.n_layers} blocks")
    out, shapes = [], {lin: config.linear_shape(lin) for lin in K.LINEARS}
    for s in state:
        out.append(LayerPreconditioners({lin: shaped(s["d_in"][lin], n) for lin, (m, n) in shapes.items()},
                                        {lin: shaped(s["d_out"][lin], m) for lin, (m, n) in shapes.items()},
                                        shaped(s["channel_weight"], config.hidden),
                                        {lin: float(s["fisher_scale"][lin]) for lin in shapes}))
    return out


def saved_ranks(config, state: list) -> list[B.Ranks]:
    """The ranks checkpoint: every block's path ranks, each within its linear's shape."""
    if len(state) != config.n_layers:
        raise ValueError(f"ranks of {len(state)} blocks for {config.n_layers} blocks")
    out = []
    for block in state:
        ranks = {lin: tuple(int(r) for r in block[lin]) for lin in K.LINEARS}
        for lin, r in ranks.items():
            if not r or not all(1 <= x <= min(config.linear_shape(lin)) for x in r):
                raise ValueError(f"{lin} ranks {r}")
        out.append(ranks)
    return out


def saved_boundary(run: Run, state: dict) -> dict:
    """The boundary checkpoint: the next block to quantize and both trajectories' hidden states."""
    recipe, hidden = run.recipe, run.source.config.hidden
    if not isinstance(state["next"], int) or not 0 <= state["next"] <= run.source.config.n_layers:
        raise ValueError(f"next block {state['next']!r}")
    shaped(state["fp"], len(run.windows), recipe.seqlen, hidden)
    shaped(state["q"], recipe.samples, recipe.seqlen, hidden)
    return state


def saved_teacher(run: Run, state: dict) -> TeacherCache:
    """The teacher cache checkpoint: top-k log-probabilities, their ids and the tail, one row per distilled window."""
    cache = TeacherCache(**state)
    n, t = len(run.recipe.distilled(run.windows)), run.recipe.seqlen
    shaped(cache.logp, n, t, cache.logp.shape[-1])
    shaped(cache.ids, *cache.logp.shape)
    shaped(cache.log_tail, n, t)
    return cache


def _timings(state: dict) -> dict[str, float]:
    """Seconds per stage of the interrupted runs (load and calibration are this run's own)."""
    if not all(isinstance(v, (int, float)) for v in state.values()):
        raise ValueError("timings are not numbers")
    return {k: float(v) for k, v in state.items() if k not in ("load", "calibration")}


def shaped(t: object, *shape: int) -> torch.Tensor:
    """`t` when it is a tensor of `shape` (checks a checkpoint's contents before they are used)."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise ValueError(f"expected a tensor of shape {list(shape)}, found "
                         f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return t


def block_norms(source, layer: int) -> dict[str, torch.Tensor]:
    return {f"{nm}.weight": source.tensor(f"blk.{layer}.{nm}.weight") for nm in source.config.block_norms()}


# --- the pipeline ---------------------------------------------------------------------------------------------------

class Timer:
    """Seconds per stage, accumulated (a stage runs once per block)."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds = dict(seconds or {})

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


@dataclass
class Run:
    """What every stage of one conversion reads: the source and its full-precision embedding/head (`base`), the drawn
    calibration windows, the ranks, recipe and seed, and where checkpoints, times and progress go."""

    source: Source
    base: TorchModel
    windows: torch.Tensor
    token_counts: torch.Tensor  # (V,) each token's count in the whole calibration text (hot rows, embedding.py)
    bits: float
    recipe: Recipe
    seed: int
    work: WorkDir
    timer: Timer
    reporter: Reporter
    ranks: list[B.Ranks] = field(default_factory=list)  # each block's path ranks, once allocated

    def fp_block(self, layer: int) -> DecoderBlock:
        """Block `layer` at full precision, built from the source's tensors."""
        return DecoderBlock(self.source.config, layer, self.source.block_weights(layer))

    def checkpoint(self, name: str, obj: object) -> None:
        """Save a stage's result, then the times so far (a resumed run reports the whole run's times)."""
        self.work.save(name, obj)
        self.work.save("timings", self.timer.seconds)


def skeleton(source: Source) -> TorchModel:
    """Embedding, final norm and head of the source, no blocks: enough for embed() and head()."""
    c = source.config
    output = None if c.tie_embeddings else source.tensor(K.OUTPUT)
    return TorchModel(c, source.tensor(K.TOKEN_EMBD), [], source.tensor(K.OUTPUT_NORM), output)


def convert(options: Options, reporter: Reporter | None = None) -> Summary:
    """Run the whole conversion and commit OUT; raises an NQError on bad input."""
    reporter = reporter or SilentReporter()
    recipe = options.recipe()
    out = Path(options.out)
    check_output(out)
    check_settings(options)
    t_start = time.perf_counter()
    timer = Timer()
    with timer.stage("load"):
        source = open_source(options.model)
        check_inputs(out, source.origin, options.calib)
        source.check_finite()
    config = source.config
    check_bits(options.bits)
    recipe = dataclasses.replace(recipe, embedding=E.resolve_embedding(recipe.embedding, config,
                                                                       options.embedding is not None))
    calib = list(options.calib) or default_calibration_texts()
    reporter.stage("calibration", 1)
    with timer.stage("calibration"):
        tokens = calibration_tokens(source.hf_tokenizer(), calib)
        windows = draw_windows(tokens, recipe.windows, recipe.seqlen, options.seed)
        token_counts = torch.bincount(torch.as_tensor(tokens, dtype=torch.int64), minlength=config.vocab)[:config.vocab]
    calib_sha = windows_sha256(windows)
    fingerprint = hashlib.sha256(json.dumps([source.sha256, options.bits, recipe.to_json(), options.seed, calib_sha,
                                             CONVERTER_VERSION]).encode()).hexdigest()
    work = WorkDir(out, fingerprint, options.resume)
    if work.has("timings"):
        timer.seconds.update(restored(work, "timings", _timings))
    run = Run(source, skeleton(source), windows, token_counts, options.bits, recipe, options.seed, work, timer,
              reporter)

    preconditioners = _preconditioners(run)
    run.ranks = _ranks(run, preconditioners)
    _blocks(run, preconditioners)
    tables = _tables(run)
    model = _assemble(run, tables)
    if recipe.model_recon:
        _reconstruct(run, model)
    for blk in model.blocks:
        for lin in B.factored_linears(blk):
            lin.round_scales_to_fp16()
    for table in model.scaled_tables():
        table.round_scales_to_fp16()
    reporter.stage("writing", 1)
    bpw = linear_bpw(config, run.ranks)
    provenance = Provenance(
        converter_version=CONVERTER_VERSION, preset=options.preset, recipe=recipe.to_json(),
        bits_target=float(options.bits), bits_achieved=bpw, source_name=source.name,
        source_sha256=source.sha256, source_params=config.parameter_count(), calibration_sha256=calib_sha,
        date=now_utc())
    with timer.stage("write"):
        try:
            write_nq(out, source, model, provenance, tables)
        except WrittenInterrupt:  # Ctrl-C during the rename: OUT is complete, its checkpoints are not needed
            work.remove()
            raise
    reporter.done()
    work.remove()
    timer.seconds["total"] = time.perf_counter() - t_start
    size = out.stat().st_size
    return Summary(out, options.bits, bpw, size * 8 / config.parameter_count(), size,
                   2 * config.parameter_count(), timer.seconds, peak_rss_mb(), model)


def _preconditioners(run: Run) -> list[LayerPreconditioners]:
    """Stage 2: every linear's preconditioners and every block's loss weights, from the first stat windows."""
    if run.work.has("preconditioners"):
        return restored(run.work, "preconditioners", lambda state: saved_preconditioners(run.source.config, state))
    recipe, n = run.recipe, run.source.config.n_layers
    run.reporter.stage("preconditioners", 2 * n)
    with run.timer.stage("preconditioners"):
        result = collect_preconditioners(run.source.config, run.base, run.fp_block, run.windows[:recipe.stat_samples],
                                         recipe.shrinkage, recipe.forward_batch, run.work.path,
                                         lambda i, total: run.reporter.advance(i))
    run.checkpoint("preconditioners", [vars(p) for p in result])
    return result


def _ranks(run: Run, preconditioners: list[LayerPreconditioners]) -> list[B.Ranks]:
    """Each block's path ranks by the recipe's allocation (checkpointed: the Fisher rule's SVDs are not free)."""
    config = run.source.config
    if run.work.has("ranks"):
        return restored(run.work, "ranks", lambda state: saved_ranks(config, state))
    with run.timer.stage("allocation"):
        ranks = allocate(run.recipe.allocation, config, run.source.block_weights, preconditioners, run.bits)
    run.checkpoint("ranks", [{lin: list(r) for lin, r in block.items()} for block in ranks])
    return ranks


def _blocks(run: Run, preconditioners: list[LayerPreconditioners]) -> None:
    """Stage 3: quantize every block not yet checkpointed; leaves block-i checkpoints and, at the end, the teacher
    cache.

    The full-precision trajectory `fp_in` runs over all drawn windows (the teacher's inputs for distillation); the
    quantized trajectory `q_in` and the tuning only over the first `recipe.samples`."""
    recipe, work, timer, reporter = run.recipe, run.work, run.timer, run.reporter
    n = run.source.config.n_layers
    boundary = restored(work, "boundary", lambda b: saved_boundary(run, b)) if work.has("boundary") else None
    start = boundary["next"] if boundary else 0
    if start == n and (work.has("teacher") or not recipe.model_recon):
        return
    if boundary:
        fp_in, q_in = boundary["fp"], boundary["q"]
    else:
        fp_in = B.block_outputs(run.base.embed, run.windows, recipe.forward_batch)
        q_in = fp_in[:recipe.samples].clone()
    del boundary
    fb = recipe.forward_batch
    for layer in range(start, n):
        blk = run.fp_block(layer)
        pre = preconditioners[layer]
        reporter.block(layer, n)
        with timer.stage("targets"):
            targets = B.block_outputs(blk, fp_in, fb, recipe.teacher_bf16)
        del fp_in
        objective = B.block_objective(layer, n, targets[:recipe.samples], pre.channel_weight, run.base.head,
                                      run.fp_block, recipe.kl_blocks, recipe.teacher_bf16)
        if recipe.error_mitigation:
            reporter.stage("error mitigation", 0)
            with timer.stage("error mitigation"):
                B.mitigate_errors(blk, q_in, objective, recipe.mitigation, B.stage_seed(run.seed, layer, 1),
                                  reporter.update)
        reporter.stage("LB-ADMM", len(K.LINEARS))
        with timer.stage("admm"):
            B.factorize(blk, run.ranks[layer], pre, recipe.admm, run.seed, lambda i, k: reporter.advance(i))
        if recipe.refine:
            reporter.stage("refinement", 0)
            with timer.stage("refinement"):
                B.refine(blk, q_in, objective, recipe.refinement, B.stage_seed(run.seed, layer, 2), reporter.update)
        B.freeze(blk)
        with timer.stage("forward"):
            q_out = B.block_outputs(blk, q_in, fb)
        fp_in, q_in = targets, q_out
        work.save(f"block-{layer:03d}", block_state(blk))
        run.checkpoint("boundary", {"next": layer + 1, "fp": fp_in, "q": q_in})  # after the block: commits it
        del blk
    reporter.block(n, n)
    if recipe.model_recon:
        reporter.stage("teacher cache", 1)
        with timer.stage("teacher cache"):
            cache = teacher_cache(run.base.head, recipe.distilled(fp_in), recipe.top_k, 1, recipe.teacher_bf16)
        run.checkpoint("teacher", vars(cache))


def _tables(run: Run) -> dict[str, E.StoredTable]:
    """The embedding and (untied) head as the file stores them (spec/CONVERTER.md, "Embedding and head"), from the
    source's tables, the final norm output's moments on the statistics windows and the calibration tokens'
    frequencies (converter/embedding.py); checkpointed, since a binary factorization takes minutes."""
    if run.work.has("tables"):
        return restored(run.work, "tables", lambda state: {k: E.StoredTable.from_state(v) for k, v in state.items()})
    recipe, config, base = run.recipe, run.source.config, run.base
    run.reporter.stage("embedding", 1)
    with run.timer.stage("embedding"):
        cols = rows = None
        if E.needs_statistics(recipe.embedding):
            final = E.final_hidden(base.embed, run.fp_block, config.n_layers, run.windows[:recipe.stat_samples],
                                   recipe.forward_batch, recipe.teacher_bf16)
            cols = E.column_weights(base.output_norm, final, recipe.shrinkage)
            rows = E.row_weights(run.windows, config.vocab, recipe.shrinkage)
        seed = B.stage_seed(run.seed, 20_000, 4)
        untied = base.output is not None  # an untied embedding is only read, not multiplied by the final norm output
        tables = {K.EMBD_TABLE: E.store_table(recipe.embedding, base.token_embd.detach(), config,
                                              None if untied else cols, rows, recipe.admm, seed, run.token_counts)}
        if untied:
            tables[K.OUTPUT_TABLE] = E.store_table(recipe.embedding, base.output.detach(), config, cols, rows,
                                                   recipe.admm, seed + 1, run.token_counts)
    run.checkpoint("tables", {k: t.state() for k, t in tables.items()})
    return tables


def _assemble(run: Run, tables: dict[str, E.StoredTable]) -> TorchModel:
    """The quantized model from the block checkpoints, with the embedding/head as the file stores them."""
    config, base = run.source.config, run.base
    blocks = [restored(run.work, f"block-{i:03d}", partial(quantized_block, config, i, block_norms(run.source, i)))
              for i in range(config.n_layers)]
    output = tables[K.OUTPUT_TABLE].torch_value() if K.OUTPUT_TABLE in tables else None
    return TorchModel(config, tables[K.EMBD_TABLE].torch_value(), blocks, base.output_norm.weight.detach(), output)


def _reconstruct(run: Run, model: TorchModel) -> None:
    """Stage 4: scale-only distillation of the assembled model; its result (all scales) is checkpointed as one file."""
    recipe = run.recipe
    scales = scale_parameters(model)
    if run.work.has("recon"):
        saved = restored(run.work, "recon", lambda state: [shaped(v, *s.shape) for s, v in zip(scales, state,
                                                                                                strict=True)])
    else:
        cache = restored(run.work, "teacher", lambda state: saved_teacher(run, state))
        run.reporter.stage("model reconstruction", 0)
        with run.timer.stage("model reconstruction"):
            reconstruct(model, recipe.distilled(run.windows), cache, recipe.recon_epochs, recipe.recon_batch,
                        recipe.recon_lr, B.stage_seed(run.seed, 10_000, 3), run.reporter.update,
                        ce_weight=recipe.recon_ce)
        saved = [s.detach().clone() for s in scales]
        run.checkpoint("recon", saved)
    with torch.no_grad():
        for s, v in zip(scales, saved):
            s.copy_(v)


def write_nq(out: Path, source, model: TorchModel, provenance: Provenance,
             tables: dict[str, E.StoredTable]) -> None:
    """Stream every tensor into NQWriter in plan order (atomic: OUT appears only when complete)."""
    config = source.config
    plans = [{name: lin.plan() for name, lin in blk.linears.items()} for blk in model.blocks]
    exports: dict[int, dict[str, np.ndarray]] = {}
    table_arrays = {name: a for key, table in tables.items() for name, a in table.export(key).items()}

    def array(name: str) -> np.ndarray:
        if name in table_arrays:
            return table_arrays[name]
        if name == K.OUTPUT_NORM:
            return source.tensor(name).numpy().astype(np.float32)
        layer = int(name.split(".")[1])
        if layer not in exports:
            exports.clear()
            blk = model.blocks[layer]
            exports[layer] = {K.norm_tensor(layer, nm): blk.norms[nm].weight.detach().numpy().astype(np.float32)
                              for nm in config.block_norms()}
            for lin_name, lin in blk.linears.items():
                exports[layer].update(lin.export(layer, lin_name))
        return exports[layer][name]

    kinds = {"embedding_type": tables[K.EMBD_TABLE].kind}
    if K.OUTPUT_TABLE in tables:
        kinds["output_type"] = tables[K.OUTPUT_TABLE].kind
    with NQWriter(out, config, source.tokenizer, provenance, plans, name=source.name, **kinds) as w:
        for spec in w.plan:
            w.write(spec.name, array(spec.name))

