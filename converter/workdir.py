"""`OUT.work/`: a conversion's checkpoints, what `--resume` continues from (spec/CONVERTER.md, "Memory, checkpoints,
resume").

A work directory is trusted only as far as it has to be. The converter marks the directories it creates
(`nqconvert-work.json`, holding the fingerprint of the run's source, settings and calibration windows) and never
deletes one without that mark; `--resume` refuses a directory whose mark is missing or names another run before
reading anything else in it. A checkpoint is one safetensors file: its tensors, plus the plain values around them
(dicts, lists, numbers, strings) as JSON in the safetensors header — never a pickle, so a planted file can at worst be
refused as damaged, not run code. Each is written to a temporary name, fsynced and renamed, so a kill or a full disk
leaves either the old checkpoint or the new one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from nqfmt.errors import NQError, one_line

MARK = "nqconvert-work.json"
FORMAT = 1  # the checkpoint layout; a work directory of another layout is not resumed
_SKELETON = "nqconvert.checkpoint"
_SUFFIX = ".safetensors"
_MAX_MARK_BYTES = 1 << 16


class WorkDirError(NQError):
    """A work directory that cannot be used or trusted; the message names it and says what to do."""


class WorkDir:
    """`OUT.work/`: `save(name, obj)`, `load(name)`, `has(name)` for checkpoints of tensors, numpy arrays and plain
    values; `path` for a stage's scratch files; `remove()` once OUT is committed."""

    def __init__(self, out: Path, fingerprint: str, resume: bool) -> None:
        self.path = out.with_name(out.name + ".work")
        check_ours(out)
        if self.path.exists():
            if resume and _mark(self.path) != fingerprint:
                raise WorkDirError(f"{self.path} was made with other settings or another source; run again "
                                   f"without --resume")
            if not resume:
                shutil.rmtree(self.path)
        if not self.path.exists():
            self.path.mkdir()
            _write_atomically(self.path / MARK, json.dumps({"made_by": "nqconvert", "format": FORMAT,
                                                             "fingerprint": fingerprint}).encode())

    def file(self, name: str) -> Path:
        return self.path / (name + _SUFFIX)

    def has(self, name: str) -> bool:
        return self.file(name).is_file()

    def save(self, name: str, obj: object) -> None:
        """Checkpoint `obj`: tensors, numpy arrays, None, bools, numbers and strings in dicts (string keys) and
        lists."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        skeleton = json.dumps(_flatten(obj, tensors, set()))
        path = self.file(name)
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(tensors, tmp, metadata={_SKELETON: skeleton})
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, Exception):
                raise WorkDirError(f"cannot save checkpoint {path}: {one_line(e)}") from e
            raise

    def load(self, name: str) -> object:
        """A checkpoint as saved; WorkDirError (one line, naming the file) when it is not one."""
        from safetensors import safe_open

        path = self.file(name)
        try:
            with safe_open(path, framework="pt") as f:
                skeleton = json.loads((f.metadata() or {})[_SKELETON])
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            return _unflatten(skeleton, tensors)
        except BaseException as e:
            if not _parse_error(e):
                raise
            raise WorkDirError(f"{path}: damaged checkpoint ({one_line(e)}); run again without --resume") from None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def check_ours(out: Path) -> None:
    """Refuse an existing `OUT.work` that the converter did not make (no valid mark), before any work is done: it
    would neither be resumed nor deleted."""
    path = out.with_name(out.name + ".work")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise WorkDirError(f"{path} exists and is not a directory; move it away or choose another OUT")
    if path.exists() and _mark(path) is None:
        raise WorkDirError(f"{path} was not made by nqconvert (it has no valid {MARK}); move it away or choose "
                           f"another OUT")


def _mark(path: Path) -> str | None:
    """The fingerprint in a work directory's mark, or None when it has no valid mark of this checkpoint layout."""
    mark = path / MARK
    try:
        if not mark.is_file() or mark.is_symlink() or mark.stat().st_size > _MAX_MARK_BYTES:
            return None
        data = json.loads(mark.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("made_by") != "nqconvert" or data.get("format") != FORMAT:
        return None
    fingerprint = data.get("fingerprint")
    return fingerprint if isinstance(fingerprint, str) else None


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parse_error(e: BaseException) -> bool:
    """Whatever reading an untrusted checkpoint can raise: any Exception, and the Rust libraries' PanicException
    (a BaseException)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _flatten(obj: object, tensors: dict[str, torch.Tensor], storages: set[int]) -> object:
    """`obj` as tagged JSON, its tensors moved into `tensors` under numbered keys (a tensor sharing memory with one
    already taken is copied: safetensors stores each buffer once)."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        tag = "tensor" if isinstance(obj, torch.Tensor) else "array"
        t = obj.detach() if isinstance(obj, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(obj))
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        key = str(len(tensors))
        tensors[key] = t
        return {tag: key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("checkpoint dicts need string keys")
        return {"dict": {k: _flatten(v, tensors, storages) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"list": [_flatten(v, tensors, storages) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"a checkpoint cannot hold a {type(obj).__name__}")


def _unflatten(node: object, tensors: dict[str, torch.Tensor]) -> object:
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError("malformed checkpoint structure")
    (tag, value), = node.items()
    if tag == "tensor":
        return tensors[value]
    if tag == "array":
        return tensors[value].numpy()
    if tag == "dict" and isinstance(value, dict):
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if tag == "list" and isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    if tag == "value" and (value is None or isinstance(value, (bool, int, float, str))):
        return value
    raise ValueError(f"malformed checkpoint structure (tag {tag!r})")
