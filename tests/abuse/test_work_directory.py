"""Finding 1: `--resume` reloads `OUT.work/`. Nothing in it can run code (checkpoints are safetensors + JSON, never
pickles), a directory without this run's fingerprint is refused before anything in it is read, a damaged checkpoint
is one error line, a failed save leaves no partial checkpoint, and checkpoints hold every path of every linear."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import torch

from converter import pipeline as P
from converter.factored import BinaryFactoredLinear, TrainablePath
from converter.torch_model import DecoderBlock
from converting import PROGRESS, interrupted_run, nqconvert, one_line
from craft import REPO, TIMEOUT, limited
from nqfmt import keys as K
from synthetic import tiny_config

class Payload:
    """A pickle that, once unpickled, creates `marker` (what an attacker's command would do)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_work_directory_without_fingerprint_is_refused_unread(tmp_path, hf_source, calib, tiny_preset):
    work = tmp_path / "m.nq.work"
    work.mkdir()
    marker = tmp_path / "ran"
    for name in ("timings.pt", "boundary.pt", "timings.safetensors", "boundary.safetensors", "settings.json"):
        (work / name).write_bytes(pickle.dumps(Payload(marker)))
    before = sorted(os.listdir(work))
    line = one_line(nqconvert(hf_source, tmp_path / "m.nq", "--preset", "tiny", "--calib", calib, "--resume"),
                    str(work))
    assert "nqconvert" in line.split("error:", 1)[1]  # says whose mark it lacks
    assert not marker.exists()
    assert sorted(os.listdir(work)) == before  # nothing read, nothing deleted
    assert not (tmp_path / "m.nq").exists()


def test_a_planted_pickle_in_a_real_work_directory_never_runs(tmp_path, hf_source, calib, tiny_preset, monkeypatch):
    work = interrupted_run(tmp_path, hf_source, calib, monkeypatch, "block-000")
    marker = tmp_path / "ran"
    planted = [p for p in work.iterdir() if p.suffix != ".json"]
    assert planted
    for path in planted:
        path.write_bytes(pickle.dumps(Payload(marker)))
    one_line(nqconvert(hf_source, tmp_path / "m.nq", "--preset", "tiny", "--calib", calib, "--resume"), "checkpoint")
    assert not marker.exists()


def test_a_damaged_checkpoint_is_one_line(tmp_path, hf_source, calib, tiny_preset, monkeypatch):
    work = interrupted_run(tmp_path, hf_source, calib, monkeypatch, "boundary")
    boundary = next(p for p in work.iterdir() if p.name.startswith("boundary"))
    boundary.write_bytes(boundary.read_bytes()[:100])
    one_line(nqconvert(hf_source, tmp_path / "m.nq", "--preset", "tiny", "--calib", calib, "--resume"),
             boundary.name)


def two_path_block() -> tuple[object, dict, DecoderBlock]:
    """A Qwen2-shaped block (q/k/v biases) whose every linear has two paths with scale_mid, all values random."""
    config = tiny_config("qwen2")
    gen = torch.Generator().manual_seed(4)
    sign = lambda *shape: torch.randint(0, 2, shape, generator=gen).float() * 2 - 1  # noqa: E731
    rand = lambda n: torch.rand(n, generator=gen) + 0.5  # noqa: E731
    linears = {}
    for name in K.LINEARS:
        m, n = config.linear_shape(name)
        paths = [TrainablePath(sign(m, r), sign(r, n), rand(n), rand(m), rand(r), frozen=True) for r in (23, 9)]
        linears[name] = BinaryFactoredLinear(paths, torch.randn(m, generator=gen) if name in K.BIASED_LINEARS
                                             else None)
    norms = {f"{nm}.weight": rand(config.norm_length(nm)) for nm in config.block_norms()}
    return config, norms, DecoderBlock(config, 0, norms, linears)


def test_block_checkpoints_hold_every_path(tmp_path):
    """Residual paths and per-path scale_mid survive save and load exactly (a checkpoint once kept path 0 only)."""
    config, norms, block = two_path_block()
    work = P.WorkDir(tmp_path / "m.nq", "f" * 64, False)
    work.save("block-000", P.block_state(block))
    back = P.quantized_block(config, 0, norms, work.load("block-000"))
    for name in K.LINEARS:
        ours, theirs = block.linears[name], back.linears[name]
        assert theirs.ranks == ours.ranks == (23, 9)
        assert all(p.scale_mid is not None for p in theirs.paths)
        assert torch.equal(theirs.dense_weight(), ours.dense_weight())
        assert (theirs.bias is None) == (ours.bias is None)
        if ours.bias is not None:
            assert torch.equal(theirs.bias, ours.bias)
    x = torch.randn(2, 5, config.hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(x), block(x))


_FULL_DISK = """
import resource, signal, sys
sys.path[:0] = {paths!r}
from presets import install_tiny
install_tiny()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
sys.argv = ["nqconvert", {src!r}, {out!r}, "--preset", "tiny", "--calib", {calib!r}, "--threads", "1"]
from converter.cli import main
main()
"""


def test_a_checkpoint_the_disk_cannot_hold_leaves_nothing_a_resume_would_trust(tmp_path, hf_source, calib,
                                                                               tiny_preset):
    """Writes past a file-size limit fail as a full disk does: one error line, no partial checkpoint, and the
    checkpoints written before it still resume to a complete file."""
    out = tmp_path / "m.nq"
    code = _FULL_DISK.format(paths=[str(REPO / "tests"), str(REPO / "tests" / "abuse"), str(REPO)], limit=20_000,
                             src=str(hf_source), out=str(out), calib=str(calib))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=TIMEOUT, preexec_fn=limited,
                          cwd=tmp_path)
    err = [ln for ln in done.stderr.decode().splitlines() if ln.strip() and not PROGRESS.match(ln)]
    assert done.returncode == 1 and len(err) == 1 and err[0].startswith("nqconvert: error: "), done.stderr.decode()
    assert "block-000" in err[0], err[0]  # the first checkpoint past the limit
    work = tmp_path / "m.nq.work"
    names = sorted(p.name for p in work.iterdir())
    assert names and not [n for n in names if "tmp" in n or "partial" in n], names
    assert not out.exists() and not (tmp_path / "m.nq.partial").exists()
    result = nqconvert(hf_source, out, "--preset", "tiny", "--calib", calib, "--threads", "1", "--resume")
    assert result.exit_code == 0, result.output
    assert out.is_file() and not work.exists()
