"""The converter's command line in-process (the `tiny` preset of conftest), for the abuse tests."""
from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from converter import pipeline as P

runner = CliRunner()
PROGRESS = re.compile(r"^\[ *\d+s\] ")  # converter/progress.py's LineReporter


def nqconvert(*args):
    from converter.cli import app
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, *needles: str) -> str:
    """Exit status 1 and one error line; progress lines before it (the run got that far) are allowed."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not PROGRESS.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("nqconvert: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def interrupted_run(tmp_path, hf_source, calib, monkeypatch, after: str):
    """A conversion killed right after the checkpoint whose name starts with `after`; returns its work directory."""
    save = P.WorkDir.save

    def interrupting(self, name, obj):
        save(self, name, obj)
        if name.startswith(after):
            raise KeyboardInterrupt

    monkeypatch.setattr(P.WorkDir, "save", interrupting)
    with pytest.raises(KeyboardInterrupt):
        P.convert(P.Options(model=str(hf_source), out=tmp_path / "m.nq", preset="tiny", calib=[calib], threads=1))
    monkeypatch.setattr(P.WorkDir, "save", save)
    return tmp_path / "m.nq.work"
