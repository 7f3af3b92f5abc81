"""Finding 4: nothing the user had is lost. OUT may not be an input (a source file, a calibration file), lie inside the
source's directory, or be an existing directory, device or FIFO; a work directory the converter did not make is never
deleted."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat

from converting import interrupted_run, nqconvert, one_line


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert_to(out, src, calib, *extra):
    return nqconvert(src, out, "--preset", "tiny", "--calib", calib, "--threads", "1", *extra)


def test_out_may_not_be_a_source_file(tmp_path, hf_source, calib, tiny_preset):
    src = tmp_path / "src"
    shutil.copytree(hf_source, src)
    weights = src / "model.safetensors"
    before = digest(weights)
    one_line(convert_to(weights, src, calib), "source")
    assert digest(weights) == before


def test_out_may_not_lie_inside_the_source_directory(tmp_path, hf_source, calib, tiny_preset):
    src = tmp_path / "src"
    shutil.copytree(hf_source, src)
    one_line(convert_to(src / "model.nq", src, calib), "source")
    assert sorted(os.listdir(src)) == sorted(os.listdir(hf_source))


def test_out_may_not_be_a_calibration_file(tmp_path, hf_source, calib, tiny_preset):
    text = tmp_path / "calib.txt"
    shutil.copy(calib, text)
    one_line(convert_to(text, hf_source, text), "calibration")
    assert text.read_bytes() == calib.read_bytes()


def test_out_may_not_be_a_fifo_or_a_directory(tmp_path, hf_source, calib, tiny_preset):
    fifo = tmp_path / "pipe.nq"
    os.mkfifo(fifo)
    one_line(convert_to(fifo, hf_source, calib), "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (tmp_path / "d.nq").mkdir()
    one_line(convert_to(tmp_path / "d.nq", hf_source, calib), "directory")


def test_a_work_directory_the_user_made_is_never_deleted(tmp_path, hf_source, calib, tiny_preset):
    work = tmp_path / "m.nq.work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    one_line(convert_to(tmp_path / "m.nq", hf_source, calib), str(work))
    assert (work / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "m.nq").exists()


def test_the_converters_own_work_directory_is_replaced_without_resume(tmp_path, hf_source, calib, tiny_preset,
                                                                      monkeypatch):
    work = interrupted_run(tmp_path, hf_source, calib, monkeypatch, "block-000")
    assert work.is_dir()
    result = convert_to(tmp_path / "m.nq", hf_source, calib)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.nq").is_file() and not work.exists()
