"""Finding 9: Ctrl-C inside the writer never leaves `OUT.partial`, and Ctrl-C at the final rename reports what
happened: the file was written. Interrupts are real SIGINTs sent to this process at the chosen moment."""
from __future__ import annotations

import os
import signal

import pytest

from converting import nqconvert
from nqfmt import open_nq
from nqfmt import writer as W
from nqfmt.errors import command_errors
from synthetic import write_random


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """SIGINT handled as in a terminal (KeyboardInterrupt), whatever this process inherited: a shell starts its
    background jobs with SIGINT ignored, and Python then leaves it ignored."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def interrupt_after(monkeypatch, target, name: str, when=lambda *args: True) -> None:
    """Make `target.name` do its work and then receive a SIGINT (once, on the first call `when(*args)` accepts)."""
    real = getattr(target, name)
    sent = []

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        if not sent and when(*args):
            sent.append(1)
            sigint()
        return result

    monkeypatch.setattr(target, name, wrapped)


@pytest.mark.parametrize("where", ["header", "tensor", "checksums", "fsync"])
def test_ctrl_c_before_the_rename_leaves_no_partial_file(tmp_path, monkeypatch, where):
    out = tmp_path / "m.nq"
    if where == "header":
        interrupt_after(monkeypatch, W.GGUFWriter, "write_kv_data_to_file")
    elif where == "tensor":
        interrupt_after(monkeypatch, W.GGUFWriter, "write_tensor_data")
    elif where == "checksums":
        interrupt_after(monkeypatch, W.NQWriter, "_crc_of_header")  # then the first tensor raises
    else:
        interrupt_after(monkeypatch, W.os, "fsync")
    with pytest.raises(KeyboardInterrupt):
        write_random(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_at_the_rename_commits_and_says_so(tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.nq"
    interrupt_after(monkeypatch, W.os, "replace")
    with pytest.raises(SystemExit) as exit_:
        with command_errors("nqconvert", False, "interrupted; run again with --resume"):
            write_random(out)
    assert exit_.value.code == 130
    line = capsys.readouterr().err.strip()
    assert "written" in line and "complete" in line and "--resume" not in line, line
    open_nq(out).verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nq"]


def test_the_converter_reports_a_file_written_under_ctrl_c(tmp_path, hf_source, calib, tiny_preset, monkeypatch):
    out = tmp_path / "m.nq"
    interrupt_after(monkeypatch, W.os, "replace", lambda src, dst: str(dst) == str(out))  # not a checkpoint's
    result = nqconvert(hf_source, out, "--preset", "tiny", "--calib", calib, "--threads", "1")
    assert result.exit_code == 130, result.output
    assert f"interrupted after {out} was written" in result.stderr
    open_nq(out).verify()
    assert not (tmp_path / "m.nq.partial").exists()


def test_an_existing_partial_link_is_replaced_not_written_through(tmp_path):
    """A leftover `OUT.partial` that is a link to another file: the writer replaces the link, the file stays."""
    precious = tmp_path / "precious.bin"
    precious.write_bytes(b"keep me")
    (tmp_path / "m.nq.partial").symlink_to(precious)
    write_random(tmp_path / "m.nq")
    assert precious.read_bytes() == b"keep me"
    open_nq(tmp_path / "m.nq").verify()
