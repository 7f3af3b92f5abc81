"""Every command turns each kind of expected failure it can meet into one `prog: error: ...` line and exit status 1.

The kinds are the subclasses of `nqfmt.NQError` (a malformed file, a bad request, an unusable source, impossible
settings, unreadable calibration text, a default text that cannot be built) and OSError. The default text is made
unbuildable for real: an empty cache and a pip that may not use any index.
"""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

import hf_tiny
from converter.cli import app as nqconvert_app
from nqfmt.cli import app as nqinfo_app
from runtime.cli import _app, evaluate, run
from synthetic_variants import write_text_model

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    nq = write_text_model(d / "m.nq")
    broken = d / "broken.nq"
    broken.write_bytes(nq.read_bytes()[:-999])
    hf_tiny.save("llama", d / "llama")
    (d / "calib.txt").write_text("abba baab " * 40)
    return {"dir": d, "nq": nq, "broken": broken, "hf": d / "llama", "calib": d / "calib.txt"}


@pytest.fixture
def no_default_text(monkeypatch, tmp_path):
    """An empty cache and a pip without an index: the default text cannot be built."""
    monkeypatch.setenv("NANOQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def one_error_line(result, prog: str, *needles: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def nqinfo(*args):
    return runner.invoke(nqinfo_app, [str(a) for a in args])


def nqrun(*args):
    return runner.invoke(_app(run), [str(a) for a in args])


def nqeval(*args):
    return runner.invoke(_app(evaluate), [str(a) for a in args])


def nqconvert(files, out, *extra):
    args = [files["hf"], out, "--samples", "2", "--seqlen", "8", "--threads", "1", *extra]
    return runner.invoke(nqconvert_app, [str(a) for a in args])


def test_nqinfo(files):
    one_error_line(nqinfo(files["broken"]), "nqinfo")  # NQFormatError
    one_error_line(nqinfo(files["dir"] / "missing.nq"), "nqinfo", "missing.nq")


def test_nqrun(files):
    one_error_line(nqrun(files["broken"], "--prompt", "x"), "nqrun")  # NQFormatError
    one_error_line(nqrun(files["nq"], "--prompt", "x", "--backend", "tpu"), "nqrun", "unknown backend")  # NQRunError
    one_error_line(nqrun(files["nq"], "--prompt", "x", "--backend", "cuda"), "nqrun", "cuda")  # BackendUnavailable


def test_nqeval(files, no_default_text):
    one_error_line(nqeval(files["broken"], "--text", files["calib"]), "nqeval")  # NQFormatError
    one_error_line(nqeval(files["nq"], "--text", files["calib"], "--ctx", "4096"), "nqeval")  # NQRunError
    one_error_line(nqeval(files["nq"], "--text", files["dir"]), "nqeval")  # OSError: a directory
    one_error_line(nqeval(files["nq"]), "nqeval", "gensim")  # DataError: the default text cannot be built


def test_nqconvert(files, tmp_path, no_default_text):
    out = tmp_path / "out.nq"
    calib = ["--calib", files["calib"]]
    one_error_line(runner.invoke(nqconvert_app, [str(files["calib"]), str(out)]), "nqconvert")  # SourceError
    one_error_line(nqconvert(files, out, "--bits", "9", *calib), "nqconvert", "--bits 9")  # ConversionError
    one_error_line(nqconvert(files, out, "--calib", tmp_path / "none.txt"), "nqconvert", "none.txt")  # Calibration
    one_error_line(nqconvert(files, out), "nqconvert", "gensim")  # DataError: the default text cannot be built
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + bytes(60))
    one_error_line(runner.invoke(nqconvert_app, [str(bad_gguf), str(out), *map(str, calib)]), "nqconvert")
    assert not out.exists() and not (tmp_path / "out.nq.work").exists()
