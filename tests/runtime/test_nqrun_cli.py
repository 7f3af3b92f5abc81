"""nqrun / nqeval: output format, and one clear line plus a non-zero exit for every bad input."""
import re
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import runtime
from runtime.cli import _app, evaluate, run
from synthetic_variants import write_text_model

runner = CliRunner()


@pytest.fixture(scope="module")
def nq(tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("cli") / "m.nq")


def nqrun(*args):
    return runner.invoke(_app(run), [str(a) for a in args])


def nqeval(*args):
    return runner.invoke(_app(evaluate), [str(a) for a in args])


def test_prompt_streams_text_and_prints_stats(nq):
    res = subprocess.run([sys.executable, "-m", "runtime.cli", str(nq), "--prompt", "hello", "-n", "12",
                          "--temperature", "0", "--stats", "--threads", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    m = runtime.load(nq, threads=1)
    assert res.stdout == m.generate("hello", max_tokens=12, temperature=0) + "\n"
    lines = res.stderr.strip().splitlines()
    assert re.fullmatch(r"prefill: 5 tokens, [\d.]+ tok/s", lines[0])
    assert re.fullmatch(rf"decode: {m.stats.decode_tokens} tokens, [\d.]+ tok/s", lines[1])
    assert re.fullmatch(r"time to first token: [\d.]+ s", lines[2])
    assert re.fullmatch(r"peak RSS: \d+ MB", lines[3]) and len(lines) == 4


def test_chat_one_turn_and_repl(nq):
    one = nqrun(nq, "--chat", "--prompt", "hi", "-n", "5", "--temperature", "0")
    assert one.exit_code == 0
    repl = runner.invoke(_app(run), [str(nq), "--chat", "-n", "5", "--temperature", "0"], input="hi\n/reset\nyo\n")
    assert repl.exit_code == 0 and repl.stdout.startswith("> " + one.stdout.rstrip("\n"))


def _one_line_error(result, *needles):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("nqrun: error:", "nqeval: error:")), result.stderr
    for n in needles:
        assert n in lines[0]


def test_bad_inputs(nq, tmp_path):
    _one_line_error(nqrun(tmp_path / "missing.nq", "--prompt", "x"), "cannot open")
    broken = tmp_path / "broken.nq"
    broken.write_bytes(nq.read_bytes()[:-1000])
    _one_line_error(nqrun(broken, "--prompt", "x"))
    _one_line_error(nqrun(nq, "--prompt", "x" * 50, "--ctx", "20"), "context holds 20")
    _one_line_error(nqrun(nq, "--prompt", "x", "--backend", "tpu"), "unknown backend")
    _one_line_error(nqrun(nq), "--prompt")
    _one_line_error(nqrun(nq, "--prompt", "x", "--top-p", "0"), "top-p")
    _one_line_error(nqrun(nq, "--prompt", "x", "--threads", "999"), "threads")
    _one_line_error(nqeval(nq, "--text", tmp_path / "none.txt"), "none.txt")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    _one_line_error(nqeval(nq, "--text", short, "--ctx", "64"), "fewer than one window")


def test_cuda_unavailable_is_one_line(nq):
    """Without CuPy the line says to install it; with CuPy (no GPU, or until the CUDA backend lands) it says why."""
    _one_line_error(nqrun(nq, "--prompt", "x", "--backend", "cuda"), "backend 'cuda'")


def test_debug_shows_the_traceback(nq, tmp_path):
    res = subprocess.run([sys.executable, "-m", "runtime.cli", str(tmp_path / "missing.nq"), "--prompt", "x",
                          "--debug"], capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_nqeval_perplexity_matches_logits(nq, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    result = nqeval(nq, "--text", text, "--ctx", "64", "--windows", "2", "--threads", "1", "--exact")
    assert result.exit_code == 0, result.stderr
    ppl = float(re.search(r"ppl: ([\d.]+)", result.stdout).group(1))
    assert re.search(r"tokens/s: [\d.]+", result.stdout)
    m = runtime.load(nq, backend="numpy")
    ids = m.tokenizer.encode(text.read_text(), add_bos=False)
    nll = []
    for w in range(2):
        window = ids[w * 64:(w + 1) * 64]
        logits = m.logits(window)[:-1].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        nll += list(logz - logits[np.arange(63), window[1:]])
    assert ppl == pytest.approx(np.exp(np.mean(nll)), rel=1e-4)


def test_console_scripts_are_declared():
    text = open(__file__.rsplit("/tests/", 1)[0] + "/pyproject.toml").read()
    assert 'nqrun = "runtime.cli:run_main"' in text and 'nqeval = "runtime.cli:eval_main"' in text
