"""nqconvert's command line: a tiny conversion end to end, and every bad input ending in one clear line, exit 1,
and nothing left behind."""
import json
import random

import pytest
from typer.testing import CliRunner

import hf_tiny
from converter.cli import app
from nqfmt import open_nq

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    hf_tiny.save("llama", d / "llama")
    rng = random.Random(2)
    (d / "calib.txt").write_text("".join(rng.choice("ab") for _ in range(600)))
    return d


def convert(tiny, out, *extra):
    args = [str(tiny / "llama"), str(out), "--samples", "6", "--seqlen", "12", "--calib", str(tiny / "calib.txt"),
            "--threads", "1", *extra]
    return runner.invoke(app, args)


def error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("nqconvert: error: ")
    return lines[0]


def test_converts_and_prints_summary(tiny, tmp_path):
    result = convert(tiny, tmp_path / "m.nq")
    assert result.exit_code == 0, result.output
    assert "bits per weight, decoder linears" in result.output and "peak RSS" in result.output
    open_nq(tmp_path / "m.nq").verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nq"]


def test_unsupported_architecture(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    result = runner.invoke(app, [str(tmp_path / "gpt2"), str(tmp_path / "m.nq")])
    assert result.exit_code == 1
    assert "not supported" in error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


@pytest.mark.parametrize("bits", ["0.3", "4.5"])
def test_bits_out_of_range_names_the_range(tiny, tmp_path, bits):
    result = convert(tiny, tmp_path / "m.nq", "--bits", bits)
    assert result.exit_code == 1
    line = error_line(result)
    assert f"--bits {bits}" in line and "0.5.." in line
    assert not list(tmp_path.iterdir())


def test_unwritable_output(tiny, tmp_path):
    result = convert(tiny, tmp_path / "missing" / "m.nq")
    assert result.exit_code == 1
    assert "does not exist" in error_line(result)
    (tmp_path / "dir.nq").mkdir()
    result = convert(tiny, tmp_path / "dir.nq")
    assert result.exit_code == 1
    assert "is a directory" in error_line(result)
    assert [p.name for p in tmp_path.iterdir()] == ["dir.nq"]


def test_missing_model_and_calibration_text(tiny, tmp_path):
    result = runner.invoke(app, [str(tmp_path / "nope"), str(tmp_path / "m.nq")])
    assert result.exit_code == 1 and "no such file" in error_line(result)
    result = runner.invoke(app, [str(tiny / "llama"), str(tmp_path / "m.nq"), "--calib", str(tmp_path / "x.txt")])
    assert result.exit_code == 1 and "x.txt" in error_line(result)
    result = convert(tiny, tmp_path / "m.nq", "--preset", "slow")
    assert result.exit_code == 1 and "quick" in error_line(result)
    assert not list(tmp_path.iterdir())


def test_debug_shows_the_exception(tiny, tmp_path):
    result = convert(tiny, tmp_path / "m.nq", "--bits", "9", "--debug")
    assert result.exit_code != 0 and result.exception is not None
    assert "outside" in str(result.exception)
