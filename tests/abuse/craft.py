"""Crafted files for the abuse tests: a valid tiny `.nq` file rewritten with chosen metadata values or tensor data,
and checksums recomputed so that only the chosen change is wrong (the reader's structural checks still pass)."""
from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from nqfmt import keys as K
from nqfmt.reader import _SCALAR, VT, NQFile

REPO = Path(__file__).resolve().parents[2]
LIMIT_AS = 6 << 30  # the address space every command case runs under
TIMEOUT = 30


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value) -> bytes:
    if vtype == VT.STRING:
        return _string(value)
    if vtype == VT.ARRAY:  # arrays of bools are the only arrays the format has
        return struct.pack("<IQ", VT.BOOL, len(value)) + bytes(bool(v) for v in value)
    return struct.pack(_SCALAR[VT(vtype)], value)


def rewrite(src: Path, dst: Path, meta: dict | None = None, tensors: dict[str, np.ndarray] | None = None) -> Path:
    """`src` with metadata values replaced (`meta`: key -> value, or key -> (value type, value) to change the type)
    and tensor data replaced (same shape and type), every checksum recomputed. Written byte by byte (GGUF's own
    writer refuses some of the malformed values wanted here, such as an empty array)."""
    f = NQFile(src)
    meta, tensors = meta or {}, tensors or {}
    kv = b""
    for key, value in f.metadata.items():
        vtype = f._types[key]
        if key in meta:
            value = meta[key]
            if isinstance(value, tuple):
                vtype, value = value
        kv += _string(key) + struct.pack("<I", vtype) + _value(vtype, value)
    infos, blobs, offset = b"", [], 0
    for name, info in f.tensors.items():
        raw = np.ascontiguousarray(tensors.get(name, f.array(name))).view(np.uint8).reshape(-1).tobytes()
        assert len(raw) == info.nbytes, name
        infos += _string(name) + struct.pack("<I", len(info.shape)) + b"".join(
            struct.pack("<Q", d) for d in _gguf_dims(info)) + struct.pack("<IQ", info.gtype, offset)
        blobs.append(raw)
        offset += len(raw) + (-len(raw)) % K.ALIGNMENT
    head = struct.pack("<IIQQ", K.GGUF_MAGIC, K.GGUF_VERSION, len(f.tensors), len(f.metadata)) + kv + infos
    head += bytes((-len(head)) % K.ALIGNMENT)
    blobs[-1] = np.array([zlib.crc32(head), *map(zlib.crc32, blobs[:-1])], dtype=np.uint32).tobytes()
    with open(dst, "wb") as out:
        out.write(head)
        for raw in blobs:
            out.write(raw + bytes((-len(raw)) % K.ALIGNMENT))
    return Path(dst)


def _gguf_dims(info) -> list[int]:
    """GGUF's dimensions (innermost first, in elements) of a tensor the reader describes."""
    return list(reversed(info.shape))


def limited() -> None:
    """preexec_fn of every command case: at most LIMIT_AS of address space."""
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))


def command(prog: str, *args, stdin: str | None = None, timeout: float = TIMEOUT, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the four commands as a subprocess under LIMIT_AS and `timeout` (a hang fails the test)."""
    module = {"nqrun": "runtime.cli:run_main", "nqeval": "runtime.cli:eval_main", "nqinfo": "nqfmt.cli:main",
              "nqconvert": "converter.cli:main", "nqserve": "nqserve.cli:main"}[prog]
    mod, fn = module.split(":")
    code = f"import sys; sys.argv[0] = {prog!r}; from {mod} import {fn}; {fn}()"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, timeout=timeout,
                          preexec_fn=limited, cwd=cwd or REPO, env=full_env,
                          input=None if stdin is None else stdin.encode("utf-8", "surrogateescape"))


def one_error_line(done: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    """Exit status 1, exactly one line on stderr, `prog: error: ...`, no traceback; the line contains `needles`."""
    err = done.stderr.decode("utf-8", "replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert done.returncode == 1, (done.returncode, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err[-3000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
