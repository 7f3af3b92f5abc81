"""Streaming, atomic `.nq` writer over the gguf package's GGUFWriter.

The whole tensor plan is declared up front (GGUF puts every tensor's info before any data), then tensors are written
one at a time in plan order, so a 70B model never sits in memory. Data go to `OUT.partial`; only a complete, fsynced
file is renamed to OUT, so an existing OUT is never left half-overwritten. Any failure or Ctrl-C before the rename
removes `OUT.partial`; a Ctrl-C during the rename is held until it is done and then raised as `WrittenInterrupt`.
"""
from __future__ import annotations

import os
import signal
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from . import keys as K
from .config import ModelConfig
from .errors import NQFormatError
from .layout import (LinearPlan, TableKind, TensorSpec, file_specs, hot_ids_valid, is_hot_ids, is_scale, is_signs,
                     sign_columns)
from .metadata import Provenance, TokenizerInfo
from .signs import padding_is_clear


class WrittenInterrupt(KeyboardInterrupt):
    """Ctrl-C that arrived while the file was being renamed into place: the file is complete, and the message (which
    the commands print) says so."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"interrupted after {path} was written; the file is complete")


class NQWriter:
    """Write one `.nq` file: `with NQWriter(...) as w: for spec in w.plan: w.write(spec.name, array)`.

    Leaving the block normally commits the file; an exception (or an incomplete plan) removes the partial file.
    """

    def __init__(self, path: str | os.PathLike, config: ModelConfig, tokenizer: TokenizerInfo,
                 provenance: Provenance, linears: list[dict[str, LinearPlan]], *,
                 embedding_type: TableKind = K.GGMLType.F16, output_type: TableKind | None = None,
                 name: str | None = None) -> None:
        """`embedding_type` / `output_type`: how the embedding / untied head are stored (spec §3.4), a GGML type
        (dense), HotRows (dense with hot rows) or the LinearPlan of a binary-factored table; the head defaults to the
        embedding's kind."""
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.config = config
        self.linears = linears
        specs = file_specs(config, linears, embedding_type, output_type)
        self.tables = {K.EMBD_TABLE: embedding_type}
        if not config.tie_embeddings:
            self.tables[K.OUTPUT_TABLE] = embedding_type if output_type is None else output_type
        self.plan: list[TensorSpec] = specs[:-1]
        self._checksum_spec = specs[-1]
        self._next = 0
        self._crcs: list[int] = []
        if not self.path.parent.is_dir():
            raise NQFormatError(f"cannot write {self.path}: directory {self.path.parent} does not exist")
        if not os.access(self.path.parent, os.W_OK):
            raise NQFormatError(f"cannot write {self.path}: directory {self.path.parent} is not writable")
        meta = {**config.to_metadata(), **tokenizer.to_metadata(), **provenance.to_metadata(), K.VERSION: K.FORMAT_VERSION}
        if name:
            meta[K.NAME] = name
        if self.partial.is_symlink() or self.partial.is_file():  # a leftover: replace it, never write through it
            self.partial.unlink()
        elif self.partial.exists():
            raise NQFormatError(f"cannot write {self.path}: {self.partial} exists and is not a regular file")
        self._gw = GGUFWriter(self.partial, K.ARCHITECTURE)
        self._gw.add_custom_alignment(K.ALIGNMENT)
        for key, spec in K.METADATA.items():
            if key in meta:
                self._add_kv(spec, meta[key])
        for spec in self.plan + [self._checksum_spec]:
            self._gw.add_tensor_info(spec.name, spec.numpy_shape, spec.numpy_dtype if spec.gtype != K.SIGN_TYPE
                                     else np.dtype(np.int32), spec.nbytes, raw_dtype=GGMLQuantizationType(spec.gtype))
        with self._discarded_on_failure():
            self._gw.write_header_to_file()
            self._gw.write_kv_data_to_file()
            self._gw.write_ti_data_to_file()
            self._header_crc = self._crc_of_header()

    def _add_kv(self, spec: K.KeySpec, value: object) -> None:
        vtype = GGUFValueType(spec.vtype)
        if spec.array:
            self._gw.add_key_value(spec.key, [bool(v) for v in value], GGUFValueType.ARRAY, sub_type=vtype)
        else:
            conv = {GGUFValueType.STRING: str, GGUFValueType.BOOL: bool, GGUFValueType.FLOAT32: float}.get(vtype, int)
            self._gw.add_key_value(spec.key, conv(value), vtype)

    def _crc_of_header(self) -> int:
        """CRC32 of every byte before the data section, alignment padding included (the padding is zeros)."""
        fout = self._gw.fout[0]
        fout.flush()
        end = fout.tell()
        with open(self.partial, "rb") as f:
            head = f.read(end)
        pad = (-end) % K.ALIGNMENT
        return zlib.crc32(bytes(pad), zlib.crc32(head))

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor of the plan; its name, shape, dtype (and finiteness, sign padding) are checked."""
        if self._next >= len(self.plan):
            raise NQFormatError(f"tensor {name!r} is beyond the plan ({len(self.plan)} tensors)")
        spec = self.plan[self._next]
        if name != spec.name:
            raise NQFormatError(f"expected tensor {spec.name!r} next, got {name!r}")
        a = np.ascontiguousarray(array)
        if a.dtype != spec.numpy_dtype or a.shape != spec.numpy_shape:
            raise NQFormatError(f"tensor {name!r}: got {a.dtype}{list(a.shape)}, "
                                f"plan says {spec.numpy_dtype}{list(spec.numpy_shape)}")
        if is_scale(name) and not np.all(np.isfinite(a)):
            raise NQFormatError(f"tensor {name!r}: scales must be finite")
        if is_signs(name) and not padding_is_clear(a, sign_columns(name, self.config, self.linears, self.tables)):
            raise NQFormatError(f"tensor {name!r}: padding bits past the last column must be 0")
        if is_hot_ids(name) and not hot_ids_valid(a, self.config.vocab):
            raise NQFormatError(f"tensor {name!r}: hot row ids must be strictly increasing token ids below the "
                                f"vocabulary of {self.config.vocab}")
        if a.dtype == np.uint32:
            a = a.view(np.int32)
        self._crcs.append(zlib.crc32(a.view(np.uint8).reshape(-1)))
        with self._discarded_on_failure():
            self._gw.write_tensor_data(a)
        self._next += 1

    def commit(self) -> Path:
        """Append the checksum table, fsync, and atomically rename the partial file to its final name. A Ctrl-C that
        arrives during the rename is raised once it is done, as WrittenInterrupt."""
        if self._next != len(self.plan):
            missing = self.plan[self._next].name
            self._discard()
            raise NQFormatError(f"file incomplete: tensor {missing!r} and {len(self.plan) - self._next - 1} more "
                                f"were never written")
        with self._discarded_on_failure():
            table = np.array([self._header_crc, *self._crcs], dtype=np.uint32).view(np.int32)
            self._gw.write_tensor_data(table)
            fout = self._gw.fout[0]
            fout.flush()
            os.fsync(fout.fileno())
            self._gw.close()
        with _sigint_held() as held:
            with self._discarded_on_failure():
                os.replace(self.partial, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        if held:
            raise WrittenInterrupt(self.path)
        return self.path

    @contextmanager
    def _discarded_on_failure(self) -> Iterator[None]:
        """Any exception (Ctrl-C included) removes the partial file; an OSError becomes one line naming it."""
        try:
            yield
        except BaseException as e:
            self._discard()
            if isinstance(e, OSError):
                raise NQFormatError(f"cannot write {self.partial}: {e.strerror or e}") from e
            raise

    def _discard(self) -> None:
        try:
            self._gw.close()
        finally:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> "NQWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._discard()


@contextmanager
def _sigint_held() -> Iterator[list[int]]:
    """Within the block, SIGINT is recorded instead of raised (main thread only: no other thread receives it); the
    list says whether one came."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)
