"""The cuda backend on one GPU against PyTorch/transformers: (a) binary GEMV against fp16 cuBLAS GEMV, (b) decode
tok/s and peak memory against transformers bf16 with a static cache, (c) prefill tok/s. One command on the
device machine; JSON into bench/results/ (and $OUT when set).

  python -m bench.gpu                      # everything
  python -m bench.gpu --parts gemv         # one part; --models, --bits, --new-tokens narrow it further
  python -m bench.gpu --dry-run            # CPU only: plan every case, build a tiny synthetic model on the numpy
                                           # backend and run it through the same code (no CuPy, no torch)

(a) y = linear(x) for m×n at each --bits target (rank from nqfmt.rank_for_bits, one path), weights built on the
host and prepared by the backend as a real file's would be; checked against a float64 numpy reference, then timed
with CUDA events around single launches, L2 flushed before each (a 512 MiB write), median of --reps. torch fp16
GEMV (cuBLAS) of a dense m×n matrix the same way. Achieved GB/s = bytes the kernel must read and write / time,
beside the measured device-to-device copy bandwidth (bytes read + written).
(b) Synthetic models with the real shapes of SmolLM2-135M, Qwen2.5-1.5B and Llama-2-7B: random signs and scales
made on the device machine (speed does not depend on values); the embedding/head table of --table kind: by default
the kind `nqconvert`'s presets write (IQ4_NL with its 3072 most frequent rows at Q8_0, spec/FORMAT.md §3.4; random
bytes with a fixed block scale), or F16. Prompt --prompt tokens, then
--new-tokens greedy tokens through GraphDecoder (one CUDA graph replay and one 4-byte copy per token); decode
tok/s counts tokens 2..N over their wall time. transformers: the same shapes in bf16, random weights, generate
with a StaticCache of prompt + max(new tokens), greedy; decode time = t(N tokens) - t(1 token). Peak memory: ours
= CuPy's pool after the run (it only grows); torch = max_memory_allocated.
(c) Prefill: one forward of --prefill tokens (last-token logits), median of 3 after a warm-up, both engines.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nqfmt import BinaryPath, FactoredLinear, ModelConfig, rank_for_bits
from nqfmt import keys as K
from nqfmt.keys import GGMLType
from runtime.kernels import constants
from runtime.model import Block, Model, rope_inv_freq

RESULTS = Path(__file__).parent / "results"
# (m, n): SmolLM2-135M's and Qwen2.5-1.5B's decoder linears (whose few rows leave most of the GPU idle), then
# Llama-2-7B's and a 70B-sized FFN
GEMV_SHAPES = ((576, 576), (1536, 576), (576, 1536), (1536, 1536), (8960, 1536), (1536, 8960),
               (4096, 4096), (11008, 4096), (4096, 11008), (8192, 28672))
MODELS = {
    "smollm2-135m": dict(arch="llama", n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536,
                         vocab=49152, context_length=8192, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True),
    "qwen2.5-1.5b": dict(arch="qwen2", n_layers=28, hidden=1536, n_heads=12, n_kv_heads=2, head_dim=128, ffn=8960,
                         vocab=151936, context_length=32768, norm_eps=1e-6, rope_theta=1e6, tie_embeddings=True,
                         attention_bias=True),
    "llama-2-7b": dict(arch="llama", n_layers=32, hidden=4096, n_heads=32, n_kv_heads=32, head_dim=128, ffn=11008,
                       vocab=32000, context_length=4096, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False),
}
TINY = dict(arch="qwen2", n_layers=2, hidden=72, n_heads=3, n_kv_heads=1, head_dim=24, ffn=100, vocab=91,
            context_length=64, norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=False, attention_bias=True)
FLUSH_BYTES = 512 << 20
MAX_KSPLIT = constants()["MAX_KSPLIT"]


# --- synthetic weights (host, then the backend's own prepare path) --------------------------------------------------
def random_linear(rng: np.random.Generator, m: int, n: int, bits: float) -> FactoredLinear:
    """One path at the rank `bits` gives; scale_out divided by sqrt(r·n) so activations stay near unit size."""
    r = rank_for_bits(m, n, bits)
    v = rng.integers(0, 1 << 32, (r, -(-n // 32)), dtype=np.uint32)
    u = rng.integers(0, 1 << 32, (m, -(-r // 32)), dtype=np.uint32)
    for words, cols in ((v, n), (u, r)):  # the format's padding bits are zero
        if cols % 32:
            words[:, -1] &= np.uint32((1 << (cols % 32)) - 1)
    s_in = rng.uniform(0.5, 1.5, n).astype(np.float16)
    s_out = (rng.uniform(0.5, 1.5, m) * rng.choice([-1, 1], m) / np.sqrt(r * n)).astype(np.float16)
    return FactoredLinear(m, n, (BinaryPath(v, u, s_in, s_out, None, r),), None)


TABLES = ("iq4_nl+3072", "f16")  # --table: the presets' kind first
HOT_ROWS = 3072


def random_blocks(rng: np.random.Generator, rows: int, hidden: int, block_bytes: int) -> np.ndarray:
    """Rows of a GGML block type (32 values per block: an F16 scale, then the codes) with random codes and the
    scale 2^-10, so values stay small whatever the codes are."""
    raw = rng.integers(0, 256, (rows, hidden // 32, block_bytes), dtype=np.uint8)
    raw[..., :2] = np.frombuffer(np.float16(2 ** -10).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def random_table(rng: np.random.Generator, config: ModelConfig, backend: Any, kind: str) -> Any:
    """An embedding/head table of `kind` (TABLES) with random values, prepared by the backend."""
    vocab, d = config.vocab, config.hidden
    if kind == "f16":
        return backend.prepare_embedding((rng.standard_normal((vocab, d)) * 0.05).astype(np.float16), GGMLType.F16, d)
    hot_ids = np.sort(rng.choice(vocab, min(HOT_ROWS, vocab // 4), replace=False))
    return backend.prepare_hot_table(random_blocks(rng, vocab - len(hot_ids), d, 18), GGMLType.IQ4_NL, hot_ids,
                                     random_blocks(rng, len(hot_ids), d, 34), vocab, d)


class SyntheticModel(Model):
    """Model.forward over random weights with a real model's shapes, built in memory: the device machine has no
    gguf package, which writing a .nq file needs. Sets what Model.__init__ sets from a file."""

    def __init__(self, config: ModelConfig, backend: Any, bits: float, table: str = TABLES[0], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.config, self.backend, self.nq = config, backend, None
        self.embedding_type = table
        self.embedding = random_table(rng, config, backend, table)
        self.head_table = self.embedding if config.tie_embeddings else random_table(rng, config, backend, table)
        ones = backend.vector(np.ones(config.hidden, np.float32))
        self.output_norm = ones
        self.blocks = []
        for layer in range(config.n_layers):
            norms = {nm: backend.vector(np.ones(config.head_dim if nm in (K.ATTN_Q_NORM, K.ATTN_K_NORM)
                                                else config.hidden, np.float32)) for nm in config.block_norms()}
            linears = {}
            for name in K.LINEARS:
                lin = random_linear(rng, *config.linear_shape(name), bits)
                if config.attention_bias and name in (K.ATTN_Q, K.ATTN_K, K.ATTN_V):
                    lin = FactoredLinear(lin.m, lin.n, lin.paths, rng.standard_normal(lin.m).astype(np.float32) * 0.1)
                linears[name] = backend.prepare_linear(lin)
            self.blocks.append(Block(norms, linears, config.sliding_layers[layer]))
        self._inv_freq = {local: rope_inv_freq(config, local) for local in (False, True)}
        self._fused = backend.fused_blocks(self)


def linear_bits(config: ModelConfig, bits: float) -> float:
    """Bits per weight of the decoder linears at this target (signs + 16-bit scales, one path)."""
    from nqfmt import path_bits
    total = weights = 0
    for name in K.LINEARS:
        m, n = config.linear_shape(name)
        total += path_bits(m, n, rank_for_bits(m, n, bits))
        weights += m * n
    return total / weights


# --- timing ----------------------------------------------------------------------------------------------------
@dataclass
class Gpu:
    """CuPy handles for timing: events, an L2 flush, stream synchronisation."""

    cp: Any

    def __post_init__(self) -> None:
        self.flush_buf = self.cp.empty(FLUSH_BYTES, np.uint8)

    def sync(self) -> None:
        self.cp.cuda.get_current_stream().synchronize()

    def event_median_us(self, launch: Callable[[], None], reps: int, flush: Callable[[], None]) -> float:
        cp = self.cp
        pairs = []
        for _ in range(reps):
            flush()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            launch()
            end.record()
            pairs.append((start, end))
        self.sync()
        return 1000 * statistics.median(cp.cuda.get_elapsed_time(s, e) for s, e in pairs)

    def copy_bandwidth(self) -> float:
        """Device-to-device copy, GB/s counting bytes read plus written (median of 10, 1 GiB)."""
        cp = self.cp
        a, b = cp.ones(1 << 30, np.uint8), cp.empty(1 << 30, np.uint8)
        b[...] = a
        us = self.event_median_us(lambda: b.__setitem__(Ellipsis, a), 10, lambda: None)
        return 2 * a.nbytes / (us * 1e-6) / 1e9


def torch_timer(torch: Any, reps: int) -> Callable[[Callable[[], None]], float]:
    flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def time_us(launch: Callable[[], None]) -> float:
        pairs = []
        for _ in range(reps):
            flush_buf.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            launch()
            e.record()
            pairs.append((s, e))
        torch.cuda.synchronize()
        return 1000 * statistics.median(s.elapsed_time(e) for s, e in pairs)
    return time_us


# --- (a) GEMV ----------------------------------------------------------------------------------------------------
def gemv_plan(bits: list[float]) -> list[dict]:
    plan = []
    for m, n in GEMV_SHAPES:
        for b in bits:
            r = rank_for_bits(m, n, b)
            plan.append(dict(m=m, n=n, bits_target=b, rank=r, bits_achieved=(r * (m + n) + 16 * (m + n)) / (m * n),
                             fp16_bytes=2 * (m * n + m + n)))
    return plan


def bench_gemv(case: dict, be: Any, gpu: Gpu, torch: Any, reps: int) -> dict:
    rng = np.random.default_rng(case["m"] + case["n"])
    m, n = case["m"], case["n"]
    lin = random_linear(rng, m, n, case["bits_target"])
    w = be.prepare_linear(lin)
    x = rng.standard_normal((1, n)).astype(np.float32)
    xd = be.device.to_device(x)
    y = be.xp.empty((1, m), np.float32)
    rel = gemv_error(be, w, lin, x)
    flush = lambda: gpu.flush_buf.fill(1)  # noqa: E731
    by_split = {}
    for k in range(1, MAX_KSPLIT + 1):  # warps per row tile: the backend's choice is a heuristic to tune from these
        wk = dataclasses.replace(w, ksplit=k)
        by_split[k] = gpu.event_median_us(lambda: be.gemv_into(wk, xd, y), reps, flush)
    ours = by_split[w.ksplit]
    moved = sum(a.nbytes for a in (w.a1, w.a2, w.s_in, w.s_mid, w.s_out)) + 4 * (n + m)
    out = dict(case, rel_error_vs_float64=rel, ours_us=ours, ours_bytes=moved, ours_gbps=moved / ours / 1e3,
               ksplit=w.ksplit, ours_us_by_ksplit=by_split, best_ksplit=min(by_split, key=by_split.get))
    if torch is not None:
        wt = torch.randn(m, n, device="cuda", dtype=torch.float16)
        xt = torch.randn(n, device="cuda", dtype=torch.float16)
        yt = torch.empty(m, device="cuda", dtype=torch.float16)
        torch.mv(wt, xt, out=yt)
        fp16 = torch_timer(torch, reps)(lambda: torch.mv(wt, xt, out=yt))
        out.update(fp16_us=fp16, fp16_gbps=case["fp16_bytes"] / fp16 / 1e3, speedup_vs_fp16=fp16 / ours)
        del wt
    return out


def gemv_error(be: Any, w: Any, lin: FactoredLinear, x: np.ndarray) -> float:
    """‖y − y_ref‖/‖y_ref‖ of one binary_gemv launch (output poisoned with NaN first) against float64 numpy."""
    y = be.xp.full((1, lin.m), np.nan, np.float32)
    be.gemv_into(w, be.device.to_device(x), y)
    got, want = be.device.to_host(y)[0].astype(np.float64), reference_linear(lin, x[0])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def reference_linear(lin: FactoredLinear, x: np.ndarray) -> np.ndarray:
    from nqfmt import unpack_signs
    p = lin.paths[0]
    h = unpack_signs(p.v_signs, lin.n, np.float32).astype(np.float64) @ (x * p.scale_in)
    return (unpack_signs(p.u_signs, p.rank, np.float32).astype(np.float64) @ h) * p.scale_out


# --- (b), (c) models ---------------------------------------------------------------------------------------------
def run_ours(config: ModelConfig, be: Any, bits: float, prompt: int, new_tokens: list[int], prefill: int,
             sync: Callable[[], None], table: str = TABLES[0]) -> dict:
    """Prefill `prompt` tokens, decode max(new_tokens) greedy tokens through GraphDecoder (decode tok/s at each
    count), then prefill tok/s at `prefill` tokens; the same calls on any backend with a GraphDecoder."""
    from runtime.backends.cuda import GraphDecoder
    t0 = time.perf_counter()
    model = SyntheticModel(config, be, bits, table)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    ids = rng.integers(0, config.vocab, prompt)
    cache = model.new_cache(prompt + max(new_tokens))
    model.forward(ids[:2], 0, cache)  # kernels loaded, outside any timing
    out = dict(build_s=build_s, bits_per_weight=linear_bits(config, bits), table=table, decode={})
    for n_new in sorted(new_tokens):
        logits = model.forward(ids, 0, cache)
        decoder = GraphDecoder(model, cache)
        token, stamps = int(np.argmax(logits[-1])), []
        for pos in range(prompt, prompt + n_new - 1):
            token = decoder.greedy(token, pos)
            stamps.append(time.perf_counter())
        # step 1 runs directly, step 2 captures the graph and replays it: timed from the end of step 2
        out["decode"][str(n_new)] = dict(tok_s=(len(stamps) - 2) / (stamps[-1] - stamps[1]), timed_tokens=len(stamps) - 2)
    pre_ids = rng.integers(0, config.vocab, prefill)
    pre_cache = model.new_cache(prefill)
    model.forward(pre_ids, 0, pre_cache)
    times = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        model.forward(pre_ids, 0, pre_cache)
        sync()
        times.append(time.perf_counter() - t0)
    out["prefill"] = dict(tokens=prefill, tok_s=prefill / statistics.median(times))
    return out


def hf_config(name: str, cfg: ModelConfig) -> Any:
    import transformers
    common = dict(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                  max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_embeddings)
    return (transformers.Qwen2Config if cfg.arch == "qwen2" else transformers.LlamaConfig)(**common)


def run_transformers(name: str, cfg: ModelConfig, prompt: int, new_tokens: list[int], prefill: int) -> dict:
    import torch
    import transformers
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(name, cfg), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab, (1, prompt), device="cuda")
    cache_len = prompt + max(new_tokens)
    cache = static_cache(transformers, model, cache_len)

    def generate(n: int) -> float:
        cache.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, past_key_values=cache,
                           pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    generate(4)  # compiles the decode step where transformers does for static caches
    one = min(generate(1) for _ in range(2))
    out = dict(transformers=transformers.__version__, torch=torch.__version__, decode={})
    for n in sorted(new_tokens):
        out["decode"][str(n)] = dict(tok_s=(n - 1) / (generate(n) - one))
    out["peak_bytes"] = torch.cuda.max_memory_allocated()
    pre = torch.randint(0, cfg.vocab, (1, prefill), device="cuda")
    with torch.no_grad():
        model(pre, use_cache=False, logits_to_keep=1)
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(pre, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out["prefill"] = dict(tokens=prefill, tok_s=prefill / statistics.median(times))
    del model, cache
    torch.cuda.empty_cache()
    return out


def static_cache(transformers: Any, model: Any, length: int) -> Any:
    """A StaticCache of `length` positions (its constructor's arguments differ between transformers versions)."""
    import torch
    for kwargs in (dict(config=model.config, max_cache_len=length),
                   dict(config=model.config, max_batch_size=1, max_cache_len=length, device="cuda",
                        dtype=torch.bfloat16)):
        try:
            return transformers.StaticCache(**kwargs)
        except TypeError:
            continue
    raise RuntimeError("transformers.StaticCache: no known constructor signature fits")


# --- the command ---------------------------------------------------------------------------------------------------
def commit() -> str | None:
    """The tree's commit: $NQ_COMMIT (the device machine gets a copy of the tree without .git), else git's HEAD."""
    if os.environ.get("NQ_COMMIT"):
        return os.environ["NQ_COMMIT"]
    import subprocess
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    except OSError:
        return None
    return out.stdout.strip() or None


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "unknown"


class Results:
    """The result JSON, rewritten after every case so a run cut short keeps what it measured."""

    def __init__(self, path: Path, header: dict) -> None:
        self.paths = [path] + ([Path(os.environ["OUT"]) / path.name] if os.environ.get("OUT") else [])
        self.data = dict(header, gemv=[], models={})

    def save(self) -> None:
        for p in self.paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(self.data, indent=1))


def dry_run(args: argparse.Namespace) -> None:
    """Plan every case and run a tiny synthetic model through run_ours on the numpy reference backend."""
    for case in gemv_plan(args.bits):
        print(f"gemv {case['m']}x{case['n']} at {case['bits_target']} bpw: rank {case['rank']}, "
              f"{case['bits_achieved']:.4f} bpw achieved, fp16 {case['fp16_bytes'] / 2**20:.1f} MiB")
    for name in args.models:
        cfg = ModelConfig(**MODELS[name])
        for b in args.bits:
            print(f"{name} at {b} bpw: {linear_bits(cfg, b):.4f} bpw over decoder linears, "
                  f"{cfg.parameter_count() / 1e9:.2f} B parameters")
    from runtime.backends import get_backend
    be = get_backend("numpy")
    tiny = ModelConfig(**TINY)
    model = SyntheticModel(tiny, be, 1.0, "f16")
    cache = model.new_cache(12)
    logits = model.forward(np.arange(8) % tiny.vocab, 0, cache)
    for pos in range(8, 11):
        logits = model.forward(np.array([int(np.argmax(logits[-1]))]), pos, cache)
    assert np.all(np.isfinite(logits)), "the tiny synthetic model gives non-finite logits"
    print(f"tiny synthetic model on the numpy backend: 8 prompt + 3 decode tokens, logits finite; load {load_average()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=("gemv", "models"), default=["gemv", "models"])
    ap.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    ap.add_argument("--bits", nargs="+", type=float, default=[1.0, 0.55])
    ap.add_argument("--model-bits", type=float, default=1.0, help="bits per weight of the synthetic models")
    ap.add_argument("--table", choices=TABLES, default=TABLES[0], help="the synthetic models' embedding/head kind")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--no-baseline", action="store_true", help="skip torch / transformers")
    ap.add_argument("--dry-run", action="store_true", help="CPU only: plan and run a tiny model on numpy")
    args = ap.parse_args(argv)
    if min(args.new_tokens) < 4 or args.prompt < 1 or args.prefill < 1 or args.reps < 1:
        ap.error("--new-tokens must be at least 4, --prompt, --prefill and --reps at least 1")
    if args.dry_run:
        dry_run(args)
        return 0

    from runtime.backends import cuda_problem
    problem = cuda_problem()
    if problem:
        print(f"bench.gpu: error: {problem}", file=sys.stderr)
        return 1
    import cupy as cp
    from runtime.backends.cuda import CudaBackend
    torch = None
    if not args.no_baseline:
        import torch
    be = CudaBackend()
    gpu = Gpu(cp)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results = Results(RESULTS / f"gpu-{stamp}.json", dict(
        device=be.device.name, cupy=cp.__version__, torch=getattr(torch, "__version__", None),
        commit=commit(), python=platform.python_version(), argv=sys.argv[1:], load_average=load_average(),
        copy_gbps=gpu.copy_bandwidth()))
    results.save()
    print(f"{be.device.name}: copy {results.data['copy_gbps']:.0f} GB/s (read + write), load {load_average()}")
    if "gemv" in args.parts:
        for case in gemv_plan(args.bits):
            r = bench_gemv(case, be, gpu, torch, args.reps)
            r["fraction_of_copy"] = r["ours_gbps"] / results.data["copy_gbps"]
            results.data["gemv"].append(r)
            results.save()
            print(f"gemv {r['m']}x{r['n']} {r['bits_target']} bpw: {r['ours_us']:.2f} us, {r['ours_gbps']:.0f} GB/s"
                  + (f"; fp16 {r['fp16_us']:.2f} us; {r['speedup_vs_fp16']:.2f}x" if torch else "")
                  + f"; rel err {r['rel_error_vs_float64']:.1e}")
    if "models" in args.parts:
        pool = cp.get_default_memory_pool()
        for name in args.models:
            cfg = ModelConfig(**MODELS[name])
            pool.free_all_blocks()
            entry = dict(ours=run_ours(cfg, be, args.model_bits, args.prompt, args.new_tokens, args.prefill,
                                       gpu.sync, args.table))
            entry["ours"]["peak_bytes"] = pool.total_bytes()
            pool.free_all_blocks()
            results.data["models"][name] = entry
            results.save()
            if torch is not None:
                entry["transformers_bf16"] = run_transformers(name, cfg, args.prompt, args.new_tokens, args.prefill)
                results.save()
            print(summary(name, entry))
    results.data["load_average_end"] = load_average()
    results.save()
    print("wrote", ", ".join(map(str, results.paths)))
    return 0


def summary(name: str, entry: dict) -> str:
    ours, hf = entry["ours"], entry.get("transformers_bf16")
    parts = [f"{name}: ours {ours['bits_per_weight']:.3f} bpw"]
    for n, d in ours["decode"].items():
        parts.append(f"decode@{n} {d['tok_s']:.0f} tok/s" + (f" vs bf16 {hf['decode'][n]['tok_s']:.0f}" if hf else ""))
    parts.append(f"prefill {ours['prefill']['tok_s']:.0f} tok/s" + (f" vs {hf['prefill']['tok_s']:.0f}" if hf else ""))
    parts.append(f"peak {ours['peak_bytes'] / 2**30:.2f} GiB" + (f" vs {hf['peak_bytes'] / 2**30:.2f}" if hf else ""))
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
