"""The conversion pipeline: calibration → preconditioners → per block (mitigation, ADMM, refinement, freeze) →
model reconstruction → `.nq` file, with presets, per-block checkpoints and progress reporting.

Memory: one full-precision block at a time (built from the source's lazily loaded tensors), the calibration hidden
states at the current block boundary (full-precision and quantized trajectories), the quantized blocks (±1 signs)
and the teacher's top-k cache — never a second copy of the whole model.

Checkpoints live in `OUT.work/` beside OUT: the preconditioners, every finished block's factors, the two boundary
activation sets after the last finished block, the teacher cache and the reconstructed scales. Every random choice
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
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nqfmt import NQWriter, Provenance
from nqfmt import keys as K
from nqfmt.errors import NQError
from nqfmt.bits import max_single_path_bits, path_bits

from . import block_reconstruction as B
from .admm import AdmmSettings
from .calibration import CalibrationError, calibration_windows, default_calibration_text, windows_sha256
from .factored import BinaryFactoredLinear
from .preconditioners import LayerPreconditioners, collect_preconditioners
from .torch_model import DecoderBlock, TorchModel
from .model_reconstruction import TOP_K, TeacherCache, reconstruct, teacher_cache
from .progress import Reporter, SilentReporter

CONVERTER_VERSION = "0.1.0"
MIN_BITS = 0.5


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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def windows(self) -> int:
        """Calibration windows to draw: the block stage tunes on the first `samples`; distillation may use more
        distinct windows (measured: 256 windows × 1 epoch beat 128 × 2), whose full-precision trajectory is carried
        through the blocks as the teacher's input."""
        return max(self.samples, self.recon_samples) if self.model_recon else self.samples

    def distilled(self, rows: torch.Tensor) -> torch.Tensor:
        """The distillation's rows of anything indexed like the drawn windows: the first `recon_samples`."""
        return rows[:self.recon_samples]


PRESETS: dict[str, Recipe] = {
    # 24.2 min for SmolLM2-135M on an idle 2-core machine, 4.33× FP ppl. Measured piecewise first: the blocks with
    # 4 refinement epochs and no distillation take 954 s (8.08×); distillation from them on 512 distinct windows
    # × 1 epoch takes 473 s and reaches 4.35× (256 × 1: 4.65×, 128 × 2: 5.09× — distinct windows beat passes
    # over the same ones). Block stage: with the first 4 blocks quantized (rest FP, ppl on 4 test windows, FP 20.56),
    # refinement epochs at batch 4 gave 1: 64.7, 2: 47.6, 4: 37.4, 8: 33.1. Distillation lr (128 × 2): 2e-3 →
    # 5.19×, 5e-3 → 5.09×, 2e-2 → 5.79×. ADMM iterations beyond ~60 buy little (100 → 200: −3%,
    # clarifications §10). On a slower 2.6 GHz EPYC host: 28.6 min, 4.38×; 26.6 min with the bfloat16 teacher;
    # with the text's cross-entropy added to the distillation loss: 26.9 min, 4.22×.
    "quick": Recipe(samples=128, seqlen=256, stat_samples=32, shrinkage=0.4, admm=AdmmSettings(iterations=60),
                    mitigation=B.TuneSettings(epochs=1, batch=4, lr=1e-4, scale_lr=0.0),
                    refinement=B.TuneSettings(epochs=4, batch=2, lr=3e-2, scale_lr=2e-2),
                    recon_samples=512, recon_epochs=1, recon_batch=1, recon_lr=5e-3, recon_ce=1.0, teacher_bf16=True),
    # Four times quick's block-stage windows, 3 refinement epochs (the 768 steps per block of the previous standard,
    # 256 windows × 6), 100 ADMM iterations, distillation on 2000 distinct windows (of the 2009 the default text
    # holds). bench/block_probe.py (first 4 blocks, 4 test windows, FP 20.56): 256 × 6 31.13, 384 × 6 30.26,
    # 512 × 4 30.12 — distinct windows again beat repeats, but 512 × 4 with this distillation would overrun the
    # 2-hour budget. On the 2.6 GHz EPYC host, bfloat16 teacher: 86.7 min idle, 3.57× FP ppl with the CE term
    # (3.70× with the KL alone; bar 3.5×), peak RSS 6.0 GB. With --scale-mid: 3.69× against 3.70× (KL alone), no
    # real gain for its 0.0087 bpw, so scale_mid stays off (spec/CONVERTER.md, "Tried and not adopted"). The text
    # holds no more distinct windows; spending the 33 min left of the budget on 1.75 passes over them gave 3.54× in
    # 115.7 min (−0.8% for +29 min, 4 min short of the bar), too little for too thin a margin: one pass stays.
    # Tuning the last block on the output KL (kl_blocks=1): 73.70 = 3.506× in 98.0 min. Then (probes, each block
    # alone quantized, 4 test windows): block 28 on the KL through full-precision block 29 22.56 → 22.16, and a
    # top-512 teacher cache 4.35× → 4.32× on quick's distillation probe; with both (kl_blocks=2, top_k=512) and the
    # KL's readout in bfloat16: 73.00 = 3.473× in 106.1 min, peak RSS 5.31 GB.
    "standard": Recipe(samples=512, seqlen=256, stat_samples=64, shrinkage=0.4, admm=AdmmSettings(iterations=100),
                       mitigation=B.TuneSettings(epochs=1, batch=4, lr=1e-4, scale_lr=0.0),
                       refinement=B.TuneSettings(epochs=3, batch=2, lr=3e-2, scale_lr=2e-2),
                       recon_samples=2000, recon_epochs=1, recon_batch=1, recon_lr=5e-3, recon_ce=1.0,
                       teacher_bf16=True, kl_blocks=2, top_k=512),
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


def max_bits(config) -> float:
    """Largest target every linear can spend with one binary path (rank min(m, n))."""
    return min(max_single_path_bits(*config.linear_shape(lin)) for lin in K.LINEARS)


def check_bits(bits: float, config) -> None:
    top = max_bits(config)
    if not MIN_BITS <= bits <= top:
        raise ConversionError(f"--bits {bits:g} is outside {MIN_BITS:g}..{top:.3f}, the range one binary path per "
                              f"linear can spend on this model (residual paths for higher targets are not built yet)")


def check_output(out: Path) -> None:
    """Refuse an OUT whose directory is missing or read-only before any work is done."""
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ConversionError(f"cannot write {out}: it is a directory")
    if not parent.is_dir():
        raise ConversionError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConversionError(f"cannot write {out}: directory {parent} is not writable")


def linear_bpw(config, ranks: dict[str, int]) -> float:
    """Bits per weight over the decoder linears, the paper's way (signs + 16-bit scales; bias not counted)."""
    bits = sum(path_bits(*config.linear_shape(lin), r) for lin, r in ranks.items())
    return bits / sum(m * n for m, n in map(config.linear_shape, K.LINEARS))


def now_utc() -> str:
    """The conversion date (the only run-dependent metadata in the file)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- checkpoints ----------------------------------------------------------------------------------------------------

class WorkDir:
    """`OUT.work/`: atomic torch.save files and a fingerprint of the settings that made them."""

    def __init__(self, out: Path, fingerprint: str, resume: bool) -> None:
        self.path = out.with_name(out.name + ".work")
        stamp = self.path / "settings.json"
        if resume and stamp.is_file() and json.loads(stamp.read_text())["fingerprint"] != fingerprint:
            raise ConversionError(f"{self.path} was made with other settings; run again without --resume")
        if not resume and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(exist_ok=True)
        stamp.write_text(json.dumps({"fingerprint": fingerprint}))

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return self.file(name).is_file()

    def save(self, name: str, obj: object) -> None:
        tmp = self.file(name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, self.file(name))

    def load(self, name: str) -> object:
        return torch.load(self.file(name), weights_only=False)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def block_state(block: DecoderBlock) -> dict[str, dict[str, torch.Tensor]]:
    """Frozen factors of a finished block: signs as int8, scales float32, bias."""
    state = {}
    for name, lin in block.linears.items():
        p = lin.paths[0]
        u, v = p.signs()
        state[name] = {"u": u.to(torch.int8), "v": v.to(torch.int8), "scale_in": p.scale_in.detach().clone(),
                       "scale_out": p.scale_out.detach().clone(), "bias": None if lin.bias is None else lin.bias.clone()}
    return state


def quantized_block(config, layer: int, norms: dict[str, torch.Tensor], state: dict) -> DecoderBlock:
    """A block of frozen BinaryFactoredLinears rebuilt from `block_state` (what the resumed run rebuilds too)."""
    linears = {}
    for name, s in state.items():
        lin = BinaryFactoredLinear.from_factors(s["u"].float(), s["v"].float(), s["scale_in"], s["scale_out"],
                                                bias=s["bias"])
        lin.freeze_signs()
        linears[name] = lin
    return DecoderBlock(config, layer, norms, linears)


def block_norms(source, layer: int) -> dict[str, torch.Tensor]:
    return {f"{nm}.weight": source.tensor(f"blk.{layer}.{nm}.weight") for nm in source.config.block_norms()}


# --- the pipeline ---------------------------------------------------------------------------------------------------

class Timer:
    """Seconds per stage, accumulated (a stage runs once per block)."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds = dict(seconds or {})

    def run(self, stage: str, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t


def skeleton(source) -> TorchModel:
    """Embedding, final norm and head of the source, no blocks: enough for embed() and head()."""
    c = source.config
    output = None if c.tie_embeddings else source.tensor(K.OUTPUT)
    return TorchModel(c, source.tensor(K.TOKEN_EMBD), [], source.tensor(K.OUTPUT_NORM), output)


def convert(options: Options, reporter: Reporter | None = None) -> Summary:
    """Run the whole conversion and commit OUT; raises ConversionError (or the source's error) on bad input."""
    from .sources import open_source

    reporter = reporter or SilentReporter()
    recipe = options.recipe()
    out = Path(options.out)
    check_output(out)
    for path in options.calib:
        if not Path(path).is_file():
            raise CalibrationError(f"calibration text {path} does not exist or is not a file")
    if options.threads is not None:
        if options.threads < 1:
            raise ConversionError(f"--threads must be at least 1, got {options.threads}")
        torch.set_num_threads(options.threads)
    t_start = time.perf_counter()
    timer = Timer()
    source = timer.run("load", open_source, options.model)
    config = source.config
    check_bits(options.bits, config)
    ranks = B.block_ranks(config, options.bits)

    calib = list(options.calib) or [default_calibration_text()]
    reporter.stage("calibration", 1)
    windows = timer.run("calibration", calibration_windows, source.hf_tokenizer(), calib, recipe.windows,
                        recipe.seqlen, options.seed)
    calib_sha = windows_sha256(windows)
    fingerprint = hashlib.sha256(json.dumps([source.sha256, options.bits, recipe.to_json(), options.seed, calib_sha,
                                             CONVERTER_VERSION]).encode()).hexdigest()
    work = WorkDir(out, fingerprint, options.resume)
    if work.has("timings.pt"):
        timer.seconds.update({k: v for k, v in work.load("timings.pt").items() if k not in ("load", "calibration")})
    base = skeleton(source)

    preconditioners = _preconditioners(source, base, windows, recipe, work, timer, reporter)
    _blocks(source, base, windows, preconditioners, ranks, recipe, options.seed, work, timer, reporter)
    model = _assemble(source, base, work)
    if recipe.model_recon:
        _reconstruct(model, windows, recipe, options.seed, work, timer, reporter)
    for blk in model.blocks:
        for lin in B.factored_linears(blk):
            lin.round_scales_to_fp16()
    reporter.stage("writing", 1)
    bpw = linear_bpw(config, ranks)
    provenance = Provenance(
        converter_version=CONVERTER_VERSION, preset=options.preset, recipe=recipe.to_json(),
        bits_target=float(options.bits), bits_achieved=bpw, source_name=source.name,
        source_sha256=source.sha256, source_params=config.parameter_count(), calibration_sha256=calib_sha,
        date=now_utc())
    timer.run("write", write_nq, out, source, model, provenance)
    reporter.done()
    work.remove()
    timer.seconds["total"] = time.perf_counter() - t_start
    size = out.stat().st_size
    return Summary(out, options.bits, bpw, size * 8 / config.parameter_count(), size,
                   2 * config.parameter_count(), timer.seconds, peak_rss_mb(), model)


def _preconditioners(source, base: TorchModel, windows: torch.Tensor, recipe: Recipe, work: WorkDir, timer: Timer,
                reporter: Reporter) -> list[LayerPreconditioners]:
    config = source.config
    if work.has("preconditioners.pt"):
        return work.load("preconditioners.pt")
    reporter.stage("preconditioners", 2 * config.n_layers)
    result = timer.run("preconditioners", collect_preconditioners, config, base,
                       lambda i: DecoderBlock(config, i, source.block_weights(i)), windows[:recipe.stat_samples],
                       recipe.shrinkage, recipe.forward_batch, work.path, lambda i, n: reporter.advance(i))
    work.save("preconditioners.pt", result)
    return result


def _blocks(source, base: TorchModel, windows: torch.Tensor, preconditioners: list[LayerPreconditioners],
            ranks: dict[str, int], recipe: Recipe, seed: int, work: WorkDir, timer: Timer,
            reporter: Reporter) -> None:
    """Quantize every block not yet checkpointed; leaves block-i.pt files and, at the end, the teacher cache.

    The full-precision trajectory `fp_in` runs over all `windows` (the teacher's inputs for distillation); the
    quantized trajectory `q_in` and the tuning only over the first `recipe.samples`."""
    config = source.config
    n = config.n_layers
    boundary = work.load("boundary.pt") if work.has("boundary.pt") else None
    start = boundary["next"] if boundary else 0
    if start == n and (work.has("teacher.pt") or not recipe.model_recon):
        return
    if boundary:
        fp_in, q_in = boundary["fp"], boundary["q"]
    else:
        fp_in = B.block_outputs(base.embed, windows, recipe.forward_batch)
        q_in = fp_in[:recipe.samples].clone()
    del boundary
    fb = recipe.forward_batch
    for layer in range(start, n):
        blk = DecoderBlock(config, layer, source.block_weights(layer))
        imp = preconditioners[layer]
        reporter.block(layer, n)
        targets = timer.run("targets", B.block_outputs, blk, fp_in, fb, recipe.teacher_bf16)
        del fp_in
        tune_targets = targets[:recipe.samples]
        objective = B.block_objective(layer, n, tune_targets, imp.channel_weight, base.head,
                                      lambda i: DecoderBlock(config, i, source.block_weights(i)), recipe.kl_blocks,
                                      recipe.teacher_bf16)
        if recipe.error_mitigation:
            reporter.stage("error mitigation", 0)
            timer.run("error mitigation", B.mitigate_errors, blk, q_in, objective, recipe.mitigation,
                      B.stage_seed(seed, layer, 1), reporter.update)
        reporter.stage("LB-ADMM", len(K.LINEARS))
        timer.run("admm", B.factorize, blk, ranks, imp, recipe.admm, seed, lambda i, k: reporter.advance(i))
        if recipe.refine:
            reporter.stage("refinement", 0)
            timer.run("refinement", B.refine, blk, q_in, objective, recipe.refinement,
                      B.stage_seed(seed, layer, 2), reporter.update)
        B.freeze(blk)
        q_out = timer.run("forward", B.block_outputs, blk, q_in, fb)
        fp_in, q_in = targets, q_out
        work.save(f"block-{layer:03d}.pt", block_state(blk))
        work.save("boundary.pt", {"next": layer + 1, "fp": fp_in, "q": q_in})  # after the block file: commits it
        work.save("timings.pt", timer.seconds)
        del blk
    reporter.block(n, n)
    if recipe.model_recon:
        reporter.stage("teacher cache", 1)
        cache = timer.run("teacher cache", teacher_cache, base.head, recipe.distilled(fp_in), recipe.top_k, 1,
                          recipe.teacher_bf16)
        work.save("teacher.pt", cache)
        work.save("timings.pt", timer.seconds)


def _assemble(source, base: TorchModel, work: WorkDir) -> TorchModel:
    """The quantized model from the block checkpoints, with the embedding/head rounded to what the file stores."""
    config = source.config
    blocks = [quantized_block(config, i, block_norms(source, i), work.load(f"block-{i:03d}.pt"))
              for i in range(config.n_layers)]
    embd = base.token_embd.detach().to(torch.float16).to(torch.float32)
    output = None if base.output is None else base.output.detach().to(torch.float16).to(torch.float32)
    return TorchModel(config, embd, blocks, base.output_norm.weight.detach(), output)


def _reconstruct(model: TorchModel, windows: torch.Tensor, recipe: Recipe, seed: int, work: WorkDir, timer: Timer,
                 reporter: Reporter) -> None:
    """Scale-only KL distillation; its result (all scales) is checkpointed as one file."""
    from .model_reconstruction import scale_parameters

    scales = scale_parameters(model)
    if work.has("recon.pt"):
        saved = work.load("recon.pt")
    else:
        cache: TeacherCache = work.load("teacher.pt")
        reporter.stage("model reconstruction", 0)
        timer.run("model reconstruction", reconstruct, model, recipe.distilled(windows),
                  cache, recipe.recon_epochs,
                  recipe.recon_batch, recipe.recon_lr, B.stage_seed(seed, 10_000, 3),
                  reporter.update, ce_weight=recipe.recon_ce)
        saved = [s.detach().clone() for s in scales]
        work.save("recon.pt", saved)
        work.save("timings.pt", timer.seconds)
    with torch.no_grad():
        for s, v in zip(scales, saved):
            s.copy_(v)


def write_nq(out: Path, source, model: TorchModel, provenance: Provenance) -> None:
    """Stream every tensor into NQWriter in plan order (atomic: OUT appears only when complete)."""
    config = source.config
    plans = [{name: lin.plan() for name, lin in blk.linears.items()} for blk in model.blocks]
    exports: dict[int, dict[str, np.ndarray]] = {}

    def array(name: str) -> np.ndarray:
        if name in (K.TOKEN_EMBD, K.OUTPUT):
            return source.tensor(name).numpy().astype(np.float16)
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

    with NQWriter(out, config, source.tokenizer, provenance, plans, name=source.name) as w:
        for spec in w.plan:
            w.write(spec.name, array(spec.name))

