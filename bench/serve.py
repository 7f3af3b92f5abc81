"""nqserve under concurrent load: 1, 4 and 8 clients streaming completions over loopback, through the openai client.

The server (`python -m nqserve`, a subprocess on a free loopback port) serves --nq with --parallel 8. Every request
sends a prompt of exactly --prompt-tokens token ids (8 distinct prompts) and streams --tokens tokens, greedy, with
usage in the last chunk. Runs, one after another:
  1 client:  8 requests back to back, one per prompt: the single-request texts and the single-client speed
  C clients: C clients at once, each sending --requests requests back to back (client i, request j: prompt i + j)
Figures per run: aggregate tok/s (all completion tokens over the run's wall time), aggregate decode tok/s (tokens
after each request's first, over the span from the first first token to the last token), per-request decode tok/s
(tokens after the first over first → last token), time to first token p50/p99 (request sent → first text), errors,
and the CPU time per completion token of the server process and of the client (both share the machine's cores).
Every streamed text is compared with its prompt's single-request text. The bars (issue 32): 0 errors and equal
texts in every run; 8 clients' aggregate tok/s ≥ 2.5× one client's; TTFT p99 with 8 clients ≤ 2 s.

Usage: python -m bench.serve --nq FILE.nq [--clients 1 4 8] [--tokens 128] [--prompt-tokens 32] [--requests 2]
       [--rounds 1] [--threads T]
With --rounds N the sequence repeats N times on the same server; the bars use each client count's best round by
aggregate tok/s (others' jobs share this machine), while errors, texts and the TTFT bar must hold in every round.
Writes bench/results/serve-<file stem>.json (-t<T> added with --threads). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

from bench.speed import commit, machine

ROOT = Path(__file__).resolve().parent.parent
PARALLEL = 8
TEXTS = [
    "The history of the city begins in the early medieval period, when a small settlement grew up around the river "
    "crossing and a market was held there every week for farmers from the surrounding villages.",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize foods "
    "from carbon dioxide and water, releasing oxygen as a by-product of the reaction.",
    "In mathematics, a prime number is a natural number greater than one that is not a product of two smaller natural "
    "numbers; the first few are two, three, five, seven and eleven.",
    "The committee met on Tuesday to discuss the budget for the coming year, and after a long debate the members "
    "agreed to increase spending on schools, roads and the public library.",
    "Once upon a time, in a village at the edge of a great forest, there lived an old woodcutter and his daughter, who "
    "every morning walked to the well to fetch water for the day.",
    "To install the software, first download the archive from the project's website, unpack it into a folder of your "
    "choice, and then run the setup script from a terminal window.",
    "The football season ended with a dramatic final match in which the home team scored twice in the last ten "
    "minutes to win the championship for the first time in forty years.",
    "Volcanoes form where molten rock from deep inside the Earth rises to the surface, often at the boundaries between "
    "tectonic plates, and eruptions can reshape the landscape within days.",
]


def prompts(path: Path, length: int) -> list[list[int]]:
    """The texts' first `length` token ids under the file's own tokenizer."""
    from nqfmt import open_nq
    from runtime.tokenizer import Tokenizer
    tok = Tokenizer(open_nq(path).tokenizer)
    out = []
    for text in TEXTS:
        ids = tok.encode(text)
        while len(ids) < length:
            ids += tok.encode(" " + text, add_bos=False)
        out.append(ids[:length])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path, port: int, threads: int | None, n_ctx: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nqserve", str(path), "--port", str(port), "--parallel", str(PARALLEL),
           "--ctx", str(n_ctx)] + (["--threads", str(threads)] if threads else [])
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"nqserve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"nqserve did not answer /health within 300 s:\n{log.read_text()}")


async def one_request(client, model: str, prompt: list[int], tokens: int) -> dict:
    """Stream one completion; the times of its first and last text and its usage."""
    sent = time.perf_counter()
    first = last = None
    pieces, usage, finish = [], None, None
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.text:
                    last = time.perf_counter()
                    first = first or last
                    pieces.append(choice.text)
                finish = choice.finish_reason or finish
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        return dict(error=f"{type(e).__name__}: {e}")
    if usage is None or first is None:
        return dict(error="the stream ended without text or usage")
    return dict(text="".join(pieces), sent=sent, first=first, last=last, tokens=usage.completion_tokens,
                prompt_tokens=usage.prompt_tokens, finish=finish)


async def run_clients(url: str, model: str, plan: list[list[int]], prompt_ids: list[list[int]],
                      tokens: int) -> tuple[float, list[dict]]:
    """plan[i]: the prompt indices client i sends back to back. Returns wall seconds and every request's record."""
    import openai
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as client:
        async def client_loop(indices: list[int]) -> list[dict]:
            out = []
            for k in indices:
                out.append(dict(await one_request(client, model, prompt_ids[k], tokens), prompt=k))
            return out

        start = time.perf_counter()
        results = await asyncio.gather(*(client_loop(p) for p in plan))
        return time.perf_counter() - start, [r for rs in results for r in rs]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process so far (this one when pid is None), its threads included."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(wall: float, records: list[dict], reference: dict[int, str] | None) -> dict:
    ok = [r for r in records if "error" not in r]
    decode = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in ok if r["tokens"] > 1 and r["last"] > r["first"]]
    ttft = [r["first"] - r["sent"] for r in ok]
    span = (max(r["last"] for r in ok) - min(r["first"] for r in ok)) if ok else 0.0
    mismatched = [r["prompt"] for r in ok if reference is not None and r["text"] != reference[r["prompt"]]]
    return dict(requests=len(records), errors=len(records) - len(ok),
                error_messages=sorted({r["error"] for r in records if "error" in r}),
                completion_tokens=sum(r["tokens"] for r in ok), wall_s=wall,
                aggregate_tps=sum(r["tokens"] for r in ok) / wall,
                aggregate_decode_tps=sum(r["tokens"] - 1 for r in ok) / span if span > 0 else 0.0,
                per_request_decode_tps=dict(mean=float(np.mean(decode)), min=float(np.min(decode)),
                                            max=float(np.max(decode))) if decode else None,
                ttft_s=dict(p50=float(np.percentile(ttft, 50)), p99=float(np.percentile(ttft, 99)),
                            max=float(np.max(ttft))) if ttft else None,
                finish_reasons=sorted({r["finish"] for r in ok}),
                texts_equal_single_request=not mismatched, mismatched_prompts=mismatched)


def main() -> None:
    ap = argparse.ArgumentParser(description="nqserve throughput and latency under 1-8 concurrent clients")
    ap.add_argument("--nq", type=Path, required=True)
    ap.add_argument("--clients", nargs="*", type=int, default=[1, 4, 8])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends back to back (C > 1)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole 1/4/8 sequence")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()
    ids = prompts(a.nq, a.prompt_tokens)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.gettempdir()) / f"nqserve-bench-{port}.log"
    proc = start_server(a.nq, port, a.threads, a.ctx, log)
    model = a.nq.stem
    load_before = os.getloadavg()
    rounds: dict[int, list[dict]] = {c: [] for c in a.clients}
    reference = None
    try:
        asyncio.run(run_clients(url, model, [[0]], ids, 8))  # warm-up: first request's one-time costs
        for rnd in range(a.rounds):
            for c in a.clients:
                plan = [list(range(len(ids)))] if c == 1 else [[(i + j) % len(ids) for j in range(a.requests)]
                                                              for i in range(c)]
                cpu = cpu_seconds(proc.pid), cpu_seconds()
                wall, records = asyncio.run(run_clients(url, model, plan, ids, a.tokens))
                cpu = cpu_seconds(proc.pid) - cpu[0], cpu_seconds() - cpu[1]
                if c == 1 and reference is None:
                    reference = {r["prompt"]: r["text"] for r in records if "error" not in r}
                s = dict(summarize(wall, records, reference), load_average=os.getloadavg())
                s["cpu_ms_per_token"] = {k: 1e3 * v / max(s["completion_tokens"], 1)
                                         for k, v in zip(("server", "client"), cpu)}
                rounds[c].append(s)
                print(f"round {rnd + 1}, {c} client(s): {s['requests']} requests, {s['errors']} errors, aggregate "
                      f"{s['aggregate_tps']:.1f} tok/s (decode {s['aggregate_decode_tps']:.1f}), per request "
                      f"{s['per_request_decode_tps']}, TTFT {s['ttft_s']}, texts equal: "
                      f"{s['texts_equal_single_request']}, CPU ms/token {s['cpu_ms_per_token']}, load {s['load_average']}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    best = {c: max(rs, key=lambda r: r["aggregate_tps"]) for c, rs in rounds.items()}
    bars = {}
    if 1 in best and 8 in best:
        bars = dict(ratio_8_over_1=best[8]["aggregate_tps"] / best[1]["aggregate_tps"],
                    decode_ratio_8_over_1=best[8]["aggregate_decode_tps"] / best[1]["per_request_decode_tps"]["mean"],
                    ttft_p99_8_clients_s=best[8]["ttft_s"]["p99"],
                    ttft_p99_8_clients_worst_round_s=max(r["ttft_s"]["p99"] for r in rounds[8]),
                    errors=sum(r["errors"] for rs in rounds.values() for r in rs),
                    texts_equal=all(r["texts_equal_single_request"] for rs in rounds.values() for r in rs))
        bars["met"] = (bars["ratio_8_over_1"] >= 2.5 and bars["ttft_p99_8_clients_worst_round_s"] <= 2.0
                       and bars["errors"] == 0 and bars["texts_equal"])
    result = dict(commit=commit(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                  load_average_before=load_before, load_average_after=os.getloadavg(),
                  settings=dict(model=str(a.nq), clients=a.clients, tokens=a.tokens, prompt_tokens=a.prompt_tokens,
                                requests_per_client=a.requests, rounds=a.rounds, statistic="best round by aggregate "
                                "tok/s for each client count; errors, texts and the TTFT bar over every round",
                                parallel=PARALLEL, threads=a.threads, n_ctx=a.ctx,
                                sampling="greedy", client="openai.AsyncOpenAI, one process, loopback",
                                command=" ".join(sys.argv)),
                  bars=bars, best={str(c): r for c, r in best.items()},
                  rounds={str(c): rs for c, rs in rounds.items()})
    out = ROOT / "bench" / "results" / f"serve-{a.nq.stem}{f'-t{a.threads}' if a.threads else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(bars), f"-> {out}")


if __name__ == "__main__":
    main()
