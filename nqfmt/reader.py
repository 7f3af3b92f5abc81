"""Memory-mapped `.nq` reader: a small bounds-checked GGUF parser, validation, and zero-copy numpy views.

The gguf package's GGUFReader builds numpy objects for every element of every metadata array, which costs seconds on
large vocabularies; this parser reads the header with `struct` and never copies tensor data. Every malformed input
becomes NQFormatError naming what is wrong, never another exception.
"""
from __future__ import annotations

import math
import mmap
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from . import keys as K
from .config import ModelConfig
from .errors import NQFormatError
from .layout import (HotRows, LinearPlan, TableKind, TensorSpec, file_specs, hot_ids_valid, is_hot_ids, is_scale,
                     is_signs, sign_columns, table_kind_name)
from .metadata import Provenance, TokenizerInfo
from .signs import padding_is_clear

VT, GGMLType = K.ValueType, K.GGMLType

_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
           VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
_MAX_DIMS = 4


VERIFY_CHUNK = 8 << 20  # bytes checksummed before their pages are let go (verify keeps ~8 MB of the file resident)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file."""

    name: str
    gtype: GGMLType
    shape: tuple[int, ...]  # numpy order, elements
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class BinaryPath:
    """One binary path of a factored linear: y += scale_out ⊙ U·(scale_mid ⊙ V·(scale_in ⊙ x)). Signs are packed
    uint32 views of the file; scales are float16 views."""

    v_signs: np.ndarray  # (r, ceil(n/32)) uint32
    u_signs: np.ndarray  # (m, ceil(r/32)) uint32
    scale_in: np.ndarray  # (n,) float16
    scale_out: np.ndarray  # (m,) float16
    scale_mid: np.ndarray | None  # (r,) float16
    rank: int


@dataclass(frozen=True)
class FactoredLinear:
    """A decoder linear (m out × n in) as the sum of its binary paths, plus an optional float32 bias; also a
    binary-factored embedding / head (m = vocabulary, n = hidden, no bias)."""

    m: int
    n: int
    paths: tuple[BinaryPath, ...]
    bias: np.ndarray | None


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header."""

    def __init__(self, buf: memoryview, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise NQFormatError(f"file truncated while reading {what} at byte {self.pos}")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise NQFormatError(f"{what}: not valid UTF-8") from e

    def value(self, vtype: int, key: str):
        if vtype == VT.STRING:
            return self.string(f"value of {key!r}")
        if vtype == VT.ARRAY:
            sub = self.scalar("<I", f"array type of {key!r}")
            count = self.scalar("<Q", f"array length of {key!r}")
            if sub == VT.STRING:
                if count > self.size - self.pos:
                    raise NQFormatError(f"array {key!r}: length {count} exceeds the file")
                return [self.string(f"element of {key!r}") for _ in range(count)]
            if sub not in _SCALAR:
                raise NQFormatError(f"array {key!r}: element type {sub} not supported")
            fmt = _SCALAR[VT(sub)]
            width = struct.calcsize(fmt)
            if count > (self.size - self.pos) // width:
                raise NQFormatError(f"array {key!r}: length {count} exceeds the file")
            start = self.take(width * count, f"array {key!r}")
            return np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=start).tolist()
        if vtype not in _SCALAR:
            raise NQFormatError(f"key {key!r}: value type {vtype} is not a GGUF type")
        return self.scalar(_SCALAR[VT(vtype)], f"value of {key!r}")


class NQFile:
    """An open `.nq` file. Opening parses and validates the header, its checksum, every tensor's shape and type
    against the config, sign padding and scale finiteness; `verify()` also checks every tensor's CRC32."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:  # non-blocking, so that a FIFO is refused rather than waited on
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise NQFormatError(f"{self.path}: not a regular file (a directory, device or FIFO)")
                self.size = info.st_size
                if self.size < 24:
                    raise NQFormatError(f"{self.path}: file truncated ({self.size} bytes), not a .nq file")
                self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
        except OSError as e:
            raise NQFormatError(f"{self.path}: cannot open: {e.strerror}") from e
        self._buf = memoryview(self._mm)
        self._address = np.frombuffer(self._mm, np.uint8, count=1).__array_interface__["data"][0]
        self.metadata, self._types, self.tensors, self.data_start = self._parse_header()
        self._check_header_crc()
        self._check_metadata_types()
        self.config = ModelConfig.from_metadata(self.metadata)
        self.tokenizer = TokenizerInfo.from_metadata(self.metadata)
        self.provenance = Provenance.from_metadata(self.metadata)
        if self.provenance.source_params < 1:  # the denominator of whole-file bits per weight
            raise NQFormatError(f"metadata key {K.SOURCE_PARAMS!r} is {self.provenance.source_params}, must be at "
                                f"least 1")
        self.linears = self._derive_plan()
        self.tables = self._derive_tables()
        self._check_tensors()

    # --- structure ----------------------------------------------------------------------------------------------
    def _parse_header(self) -> tuple[dict[str, object], dict[str, int], dict[str, TensorInfo], int]:
        c = _Cursor(self._buf, self.size)
        if c.scalar("<I", "magic") != K.GGUF_MAGIC:
            raise NQFormatError(f"{self.path}: bad magic, not a GGUF file")
        version = c.scalar("<I", "version")
        if version != K.GGUF_VERSION:
            raise NQFormatError(f"{self.path}: GGUF version {version} not supported (expected {K.GGUF_VERSION})")
        n_tensors = c.scalar("<Q", "tensor count")
        n_kv = c.scalar("<Q", "metadata count")
        if n_kv > (self.size - c.pos) // 13 or n_tensors > (self.size - c.pos) // 29:
            raise NQFormatError(f"{self.path}: header counts ({n_kv} keys, {n_tensors} tensors) exceed the file size")
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = c.string("metadata key")
            if key in meta:
                raise NQFormatError(f"metadata key {key!r} appears twice")
            vtype = c.scalar("<I", f"type of {key!r}")
            meta[key] = (vtype, c.value(vtype, key))
        arch = meta.get(K.ARCH, (None, None))[1]
        if arch != K.ARCHITECTURE:
            raise NQFormatError(f"{self.path}: general.architecture is {arch!r}, not {K.ARCHITECTURE!r}: "
                                f"not a NanoQuant .nq file")
        align = meta.get(K.ALIGNMENT_KEY, (None, None))[1]
        if align != K.ALIGNMENT:
            raise NQFormatError(f"metadata key {K.ALIGNMENT_KEY!r} is {align!r}, expected {K.ALIGNMENT}")
        raw = []
        for _ in range(n_tensors):
            name = c.string("tensor name")
            n_dims = c.scalar("<I", f"dimension count of {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise NQFormatError(f"tensor {name!r}: {n_dims} dimensions")
            dims = [c.scalar("<Q", f"shape of {name!r}") for _ in range(n_dims)]
            gtype = c.scalar("<I", f"type of {name!r}")
            offset = c.scalar("<Q", f"offset of {name!r}")
            raw.append((name, dims, gtype, offset))
        data_start = c.pos + (-c.pos) % K.ALIGNMENT
        tensors: dict[str, TensorInfo] = {}
        end = data_start
        for name, dims, gtype, offset in raw:
            if name in tensors:
                raise NQFormatError(f"tensor {name!r} appears twice")
            if gtype not in K.TYPE_SIZES:
                raise NQFormatError(f"tensor {name!r}: GGML type {gtype} is not used by this format")
            if any(d == 0 or d > self.size for d in dims):
                raise NQFormatError(f"tensor {name!r}: impossible shape {dims}")
            spec = TensorSpec(name, tuple(reversed(dims)), GGMLType(gtype))
            if gtype in K.BLOCK_TYPES and dims[0] % K.TYPE_SIZES[gtype][0]:
                raise NQFormatError(f"tensor {name!r}: {spec.gtype.name} rows must be a multiple of 32")
            if data_start + offset != end:
                raise NQFormatError(f"tensor {name!r}: offset {offset} breaks the packed, aligned layout")
            tensors[name] = TensorInfo(name, spec.gtype, spec.shape, data_start + offset, spec.nbytes)
            end = data_start + offset + spec.nbytes + (-spec.nbytes) % K.ALIGNMENT
        if end != self.size:
            raise NQFormatError(f"{self.path}: file is {self.size} bytes, its tensors end at {end} "
                                f"({'truncated' if end > self.size else 'trailing bytes'})")
        return {k: v for k, (_, v) in meta.items()}, {k: t for k, (t, _) in meta.items()}, tensors, data_start

    def _check_header_crc(self) -> None:
        table = self.tensors.get(K.CHECKSUMS)
        if table is None or table.gtype != GGMLType.I32 or table.shape != (len(self.tensors),):
            raise NQFormatError(f"tensor {K.CHECKSUMS!r} is missing or has the wrong shape")
        if list(self.tensors)[-1] != K.CHECKSUMS:
            raise NQFormatError(f"tensor {K.CHECKSUMS!r} must be the last tensor")
        expected = int(self._view(table)[0])
        if zlib.crc32(self._buf[:self.data_start]) != expected:
            raise NQFormatError(f"{self.path}: header checksum mismatch (metadata or tensor table corrupted)")

    def _check_metadata_types(self) -> None:
        types = self._types
        for key, spec in K.METADATA.items():
            if key not in self.metadata:
                if spec.required:
                    raise NQFormatError(f"metadata key {key!r} is missing")
                continue
            want = VT.ARRAY if spec.array else spec.vtype
            if types[key] != want:
                raise NQFormatError(f"metadata key {key!r} has type {types[key]}, expected {want.name}")
        if self.metadata[K.VERSION] != K.FORMAT_VERSION:
            raise NQFormatError(f"format version {self.metadata[K.VERSION]} not supported "
                                f"(this reader reads version {K.FORMAT_VERSION})")

    def _derive_plan(self) -> list[dict[str, LinearPlan]]:
        """Ranks come from the V-sign shapes; the full expected plan is then rebuilt and compared tensor by tensor."""
        if self.config.n_layers * len(K.LINEARS) > len(self.tensors):
            raise NQFormatError(f"config has {self.config.n_layers} blocks but the file holds only "
                                f"{len(self.tensors)} tensors")
        plan = []
        for layer in range(self.config.n_layers):
            block = {}
            for linear in K.LINEARS:
                block[linear] = self._path_plan(lambda p, part: K.path_tensor(layer, linear, p, part))
                if not block[linear].ranks:
                    raise NQFormatError(f"tensor {K.path_tensor(layer, linear, 0, K.V_SIGNS)!r} is missing")
            plan.append(block)
        return plan

    def _path_plan(self, name) -> LinearPlan:
        """Ranks of the paths `name(p, part)` present (from their V-sign shapes; more than MAX_PATHS are kept for the
        plan check to refuse) and whether path 0 has scale_mid."""
        ranks = []
        while (t := self.tensors.get(name(len(ranks), K.V_SIGNS))) is not None and len(ranks) <= K.MAX_PATHS:
            ranks.append(t.shape[0])
        return LinearPlan(tuple(ranks), name(0, K.SCALE_MID) in self.tensors)

    def _derive_tables(self) -> dict[str, TableKind]:
        """The embedding's kind and, for untied models, the head's (spec §3.4): dense when `T.weight` is present,
        binary-factored when `T.p0.v_signs` is; the plan check then compares every tensor."""
        tables = {}
        for table in (K.EMBD_TABLE,) if self.config.tie_embeddings else (K.EMBD_TABLE, K.OUTPUT_TABLE):
            dense = self.tensors.get(K.dense_table_tensor(table))
            factored = self._path_plan(lambda p, part: K.table_path_tensor(table, p, part))
            if dense is not None and factored.ranks:
                raise NQFormatError(f"both {dense.name!r} and {K.table_path_tensor(table, 0, K.V_SIGNS)!r} are "
                                    f"present: the table is dense or binary-factored, not both")
            if dense is None and not factored.ranks:
                raise NQFormatError(f"tensor {K.dense_table_tensor(table)!r} is missing (and no binary-factored "
                                    f"{table!r} either)")
            hot = self.tensors.get(K.hot_ids_tensor(table))
            if dense is None:
                tables[table] = factored
            else:
                tables[table] = dense.gtype if hot is None else HotRows(dense.gtype, hot.shape[0] if hot.shape else 0)
        return tables

    def _check_tensors(self) -> None:
        expected = file_specs(self.config, self.linears, self.tables[K.EMBD_TABLE], self.tables.get(K.OUTPUT_TABLE))
        names = {s.name for s in expected}
        pending = _Pages(self)  # sign tensors read by the padding check, let go VERIFY_CHUNK bytes at a time
        for name in self.tensors:
            if name not in names:
                raise NQFormatError(f"unexpected tensor {name!r}")
        for spec in expected:
            info = self.tensors.get(spec.name)
            if info is None:
                raise NQFormatError(f"tensor {spec.name!r} is missing")
            if info.gtype != spec.gtype or info.shape != spec.shape:
                raise NQFormatError(f"tensor {spec.name!r}: {info.gtype.name}{list(info.shape)} where the config "
                                    f"needs {spec.gtype.name}{list(spec.shape)}")
            if is_scale(spec.name) and not np.all(np.isfinite(self._view(info))):
                raise NQFormatError(f"tensor {spec.name!r}: non-finite scale")
            if is_hot_ids(spec.name) and not hot_ids_valid(self._view(info), self.config.vocab):
                raise NQFormatError(f"tensor {spec.name!r}: hot row ids must be strictly increasing token ids "
                                    f"below the vocabulary of {self.config.vocab}")
            if is_signs(spec.name) and not padding_is_clear(
                    self._view(info), sign_columns(spec.name, self.config, self.linears, self.tables)):
                raise NQFormatError(f"tensor {spec.name!r}: padding bits past the last column are not 0")
            if is_signs(spec.name):
                pending.add(info.offset, info.nbytes)
        pending.flush()

    # --- access -------------------------------------------------------------------------------------------------
    def _view(self, info: TensorInfo) -> np.ndarray:
        spec = TensorSpec(info.name, info.shape, info.gtype)
        count = math.prod(spec.numpy_shape)
        return np.frombuffer(self._mm, dtype=spec.numpy_dtype, count=count, offset=info.offset).reshape(spec.numpy_shape)

    def array(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of a tensor (packed signs as uint32, Q8_0 and Q4_0 as raw bytes)."""
        if name not in self.tensors:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        return self._view(self.tensors[name])

    def release(self, *views: np.ndarray) -> None:
        """Let the OS take the pages under these views of the file out of this process's resident set
        (MADV_DONTNEED; a later read faults them back in from the page cache, unchanged). For tensors a reader has
        copied into a layout of its own, so that they are not resident twice."""
        for v in views:
            start = v.__array_interface__["data"][0] - self._address
            if 0 <= start and start + v.nbytes <= self.size:
                self._drop(start, v.nbytes)

    def _drop(self, offset: int, nbytes: int) -> None:
        """MADV_DONTNEED over the pages that bytes offset..offset+nbytes touch, where the platform has it."""
        if nbytes > 0 and hasattr(mmap, "MADV_DONTNEED"):
            start = offset - offset % mmap.PAGESIZE
            self._mm.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)

    def linear(self, layer: int, linear: str) -> FactoredLinear:
        """A decoder linear with all its binary paths (views into the file)."""
        m, n = self.config.linear_shape(linear)
        bias_name = K.bias_tensor(layer, linear)
        bias = self.array(bias_name) if bias_name in self.tensors else None
        return self._factored(m, n, self.linears[layer][linear],
                              lambda p, part: K.path_tensor(layer, linear, p, part), bias)

    def factored_table(self, table: str) -> FactoredLinear:
        """A binary-factored embedding (`table` = K.EMBD_TABLE) or untied head (K.OUTPUT_TABLE): V×d, no bias."""
        plan = self.tables[table]
        if not isinstance(plan, LinearPlan):
            raise KeyError(f"{table!r} is stored dense ({table_kind_name(plan)}) in {self.path}")
        return self._factored(self.config.vocab, self.config.hidden, plan,
                              lambda p, part: K.table_path_tensor(table, p, part), None)

    def hot_table(self, table: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A hot-row embedding or untied head (spec §3.4): (the other rows' 4-bit bytes, the hot rows' token ids as
        int64, their Q8_0 bytes)."""
        if not isinstance(self.tables[table], HotRows):
            raise KeyError(f"{table!r} has no hot rows in {self.path}")
        return (self.array(K.dense_table_tensor(table)), self.array(K.hot_ids_tensor(table)).astype(np.int64),
                self.array(K.hot_rows_tensor(table)))

    def _factored(self, m: int, n: int, plan: LinearPlan, name, bias: np.ndarray | None) -> FactoredLinear:
        paths = []
        for p, r in enumerate(plan.ranks):
            part = lambda x: self.array(name(p, x))  # noqa: E731
            paths.append(BinaryPath(part(K.V_SIGNS), part(K.U_SIGNS), part(K.SCALE_IN), part(K.SCALE_OUT),
                                    part(K.SCALE_MID) if plan.has_mid else None, r))
        return FactoredLinear(m, n, tuple(paths), bias)

    def verify(self) -> None:
        """Check every tensor's CRC32 and that all alignment padding is zero. The pages read leave the resident set
        as it goes (release): a reader faults back in only what it uses."""
        table = self._view(self.tensors[K.CHECKSUMS])
        pending = _Pages(self)
        for i, info in enumerate(list(self.tensors.values())[:-1]):
            crc = 0
            for start in range(info.offset, info.offset + info.nbytes, VERIFY_CHUNK):  # read once, then let go
                end = min(start + VERIFY_CHUNK, info.offset + info.nbytes)
                crc = zlib.crc32(self._buf[start:end], crc)
                pending.add(start, end - start)
            if crc != int(table[i + 1]):
                raise NQFormatError(f"tensor {info.name!r}: checksum mismatch (data corrupted)")
        for info in self.tensors.values():
            pad = self._buf[info.offset + info.nbytes:info.offset + info.nbytes + (-info.nbytes) % K.ALIGNMENT]
            if any(pad):
                raise NQFormatError(f"tensor {info.name!r}: alignment padding after it is not zero")
        self._drop(0, self.size)  # what the padding checks read back in


class _Pages:
    """Bytes of the file read and not yet let go, as one span that is dropped (MADV_DONTNEED) once it covers
    VERIFY_CHUNK bytes: a pass over many small tensors makes a few madvise calls, not one per tensor."""

    def __init__(self, nq: NQFile) -> None:
        self.nq, self.lo, self.hi = nq, 0, 0

    def add(self, offset: int, nbytes: int) -> None:
        empty = self.hi == self.lo
        self.lo = offset if empty else min(self.lo, offset)
        self.hi = offset + nbytes if empty else max(self.hi, offset + nbytes)
        if self.hi - self.lo >= VERIFY_CHUNK:
            self.flush()

    def flush(self) -> None:
        self.nq._drop(self.lo, self.hi - self.lo)
        self.lo = self.hi = 0


def open_nq(path: str | os.PathLike) -> NQFile:
    """Open and validate a `.nq` file (see NQFile)."""
    return NQFile(path)
