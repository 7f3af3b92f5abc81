"""The numba backend: float32 CPU kernels (numba_kernels.py; LUT-16 on AVX-512, numba_lut16.py, where a decoding
step's blocks are fused into one call, numba_decode.py) behind the Backend interface.

Before numba is imported this module picks three process-wide settings (each only where the user has not):
- OpenMP threads (workqueue where numba has no OpenMP) spin a few ms after a parallel region before they sleep
  (SPIN_AFTER_REGION), unless OMP_WAIT_POLICY is set: a decoding token's regions follow each other within that time,
  and a worker woken from sleep joins each region late (runtime/README.md, "Threads"). The spin is bounded, so an idle
  runtime leaves the cores to others; a process whose other threads need the cores between regions (nqserve's HTTP
  side) sets OMP_WAIT_POLICY=passive.
- the kernel cache: next to the package when that is writable (numba's default), else NUMBA_CACHE_DIR under the
  user's cache directory ($NANOQUANT_CACHE, else $XDG_CACHE_HOME/nanoquant, as nqdata), so kernels compile once
  per machine either way.
- glibc's malloc thresholds (MALLOC_THRESHOLDS), unless a MALLOC_* or GLIBC_TUNABLES variable is set.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from nqfmt.keys import GGMLType


# How long OpenMP's workers spin after a region before they sleep: 50000 pause rounds, a few ms (GNU OpenMP, which
# numba's Linux wheels use); 3 ms (LLVM and Intel OpenMP).
SPIN_AFTER_REGION = {"GOMP_SPINCOUNT": "50000", "KMP_BLOCKTIME": "3"}


# glibc's malloc serves a request above M_MMAP_THRESHOLD (128 KB at start) with a fresh mapping whose pages all fault
# in when first written, and gives freed heap above M_TRIM_THRESHOLD back to the system; its own rule raises both (to
# 32 MB and 64 MB at most) only after a large block has been freed. A prefill allocates and frees arrays of a few MB
# per op: with these values from the start they reuse the heap (runtime/README.md, "Prefill").
MALLOC_THRESHOLDS = {-3: 32 << 20, -1: 64 << 20}  # mallopt's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def _configure_malloc() -> None:
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"
                                                   for k in os.environ):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; other C libraries may lack it
    if mallopt is not None:
        for param, value in MALLOC_THRESHOLDS.items():
            mallopt(param, value)


def _configure_numba() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:
        for key, value in SPIN_AFTER_REGION.items():
            os.environ.setdefault(key, value)
    os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp workqueue tbb")
    if "NUMBA_CACHE_DIR" not in os.environ and not os.access(Path(__file__).parent, os.W_OK):
        from nqdata import cache_dir
        os.environ["NUMBA_CACHE_DIR"] = str(cache_dir() / "numba")
        if "numba" in sys.modules:  # imported earlier by the caller: tell its config too
            import numba
            numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


_configure_numba()
_configure_malloc()

import numba  # noqa: E402
from numba.typed import List  # noqa: E402

from nqfmt import FactoredLinear, NQFormatError  # noqa: E402

from ..errors import NQRunError  # noqa: E402
from . import Backend, KVCache  # noqa: E402
from . import gemm_attention, gemm_head, hot_rows  # noqa: E402
from .blas_workers import BlasWorkers  # noqa: E402
from . import numba_decode as nd  # noqa: E402
from . import numba_fixed as fixed  # noqa: E402
from . import numba_kernels as nk  # noqa: E402
from . import numba_lut16 as lut16  # noqa: E402
from . import numba_tables as nt  # noqa: E402
from . import numba_int8 as int8  # noqa: E402

DEFAULT_MAX_THREADS = 4
# Below these sizes a thread launch costs more than it saves. Passive waiting makes each parallel region wake a
# sleeping thread: on SmolLM2-135M (gate/up/down 99 K sign bytes, q/o 36 K, k/v 12 K) parallel decode linears made
# 2-thread decode 40% slower than 1 thread on an idle 2-core machine, so one-token linears stay serial up to 8× that
# size; the head (28 M weights), prefill (parallel over groups of tokens) and long attention still use the threads.
PARALLEL_MIN_LOOKUPS = 800 * 1024  # sign bytes of one decode path
PARALLEL_MIN_ATTENTION = 4096  # query × key pairs (× heads) of one attention call
# The same rule holds for several tokens (a batched decoding step, a prefill slice): their LUT-16 products run on the
# threads only from PARALLEL_MIN_LOOKUPS sign bytes × tokens (an 8-sequence step on SmolLM2-135M stays serial: its
# q projection took 219 µs on 2 threads against 7 µs for one token). Without AVX-512 they go through
# binary_path_lanes, LANES tokens per task; up to LANES tokens that is one task, run serially. The head's
# several-token kernel is for a batched step's few rows.
HEAD_DOTS_MAX_TOKENS = 2 * nk.DOT_TOKENS
# The int8 head runs on the threads from this many rows × tokens: a hot-row table's 3072-row Q8_0 part took 40 µs
# for one token serially and 62 µs on 2 threads (its 46080-row IQ4_NL part 671 → 388 µs).
HEAD_PARALLEL_MIN_ROWS = 8192
# A decoding step (one token per sequence) runs fused (numba_decode.py). A ragged step (a prompt slice beside decoding
# sequences) whose products would all stay serial by that rule instead splits its sequences over the threads
# (step_threads): each thread runs its sequences through every block, its own ops serial. Each thread's ~14 Python
# calls per block hold the GIL, so a split pays only from several sequences per thread: on SmolLM2-135M's quick file
# (idle, 2 threads, 200 steps, median ms per step) 8 sequences took 27.2 / 24.9 split against 31.4 / 29.7 in one
# pass, 4 sequences 23.4 / 24.7 split against 22.0 / 19.8.
STEP_SPLIT_MIN_SEQUENCES = 4


@dataclass(frozen=True)
class SignPath:
    """One binary path as the kernels read it: sign bytes (views of the file) and float32 scales."""

    v_bytes: np.ndarray  # (r, 4·words(n)) uint8
    u_bytes: np.ndarray  # (m, 4·words(r)) uint8
    s_in: np.ndarray
    s_mid: np.ndarray  # ones when the file has no scale_mid
    s_out: np.ndarray
    v_tiles: np.ndarray | None  # the signs repacked for LUT-16 (numba_lut16.repack) or for the fixed-point kernels
    u_tiles: np.ndarray | None  # (numba_fixed.repack); None where LUT-8 reads the file's bytes


@dataclass(frozen=True)
class Linear:
    m: int
    n: int
    paths: tuple[SignPath, ...]
    bias: np.ndarray | None
    decode: SimpleNamespace  # the serial or parallel kernels, chosen by size for one-token products
    lookups: int  # sign bytes of all paths: t tokens are worth the threads from PARALLEL_MIN_LOOKUPS / lookups on


@dataclass(frozen=True)
class Table:
    """An embedding / head table as stored: F16 bits (uint16), F32, or Q8_0 bytes plus their int8 view and, for the
    int8 head, their repacked tiles (numba_int8.repack_q8)."""

    gtype: GGMLType
    data: np.ndarray
    qs: np.ndarray | None
    hidden: int
    tiles: tuple[np.ndarray, np.ndarray] | None = None


class NumbaBackend(Backend):
    """float32 kernels on `threads` CPU threads (numba's thread count is per process: the backend built last sets
    it for all)."""

    name = "numba"
    dtype = np.dtype(np.float32)
    jit = True

    def __init__(self, threads: int | None = None, exact: bool = False, simd: bool | None = None) -> None:
        cores = numba.config.NUMBA_NUM_THREADS
        self.threads = min(cores, DEFAULT_MAX_THREADS) if threads is None else threads
        if not 1 <= self.threads <= cores:
            raise NQRunError(f"--threads {self.threads}: this machine allows 1 to {cores}")
        numba.set_num_threads(self.threads)
        self.rows = nk.PARALLEL if self.threads > 1 else nk.SERIAL
        self.simd = lut16.available() if simd is None else simd  # LUT-16 kernels (AVX-512), else LUT-8
        # binary linears on 11-bit fixed-point inputs by AVX2 where LUT-16 does not run (exact=True: LUT-8)
        self.fixed_linears = not exact and not self.simd and int8.isa() is not None
        # LUT-16 and the fixed-point kernels run on repacked tiles of the signs (and LUT-16 of 4-bit codes)
        self.copies_weights = self.simd or self.fixed_linears
        # the 4-bit / Q8_0 head on int8 tokens: by VNNI where LUT-16 runs (AVX-512 without VNNI keeps LUT-16's float
        # head), by AVX2 below that
        self.int8_head = not exact and int8.isa() == ("vnni" if self.simd else "avx2")
        self._scratch_bytes = 0  # widest sign row seen (bytes), sizes the shared scratch buffers
        self._scratch_rows = 0  # largest rank of any path
        self._max_lookups = 0  # sign bytes of the largest linear
        self._widest = (0, 0, 0)  # largest n, rank and m of any path: sizes the fixed-point kernels' scratch
        self._local = threading.local()  # per thread: the one-token scratch, the step's cache lists
        self._blas = BlasWorkers(self.threads)  # threads for many-token attention and head products on BLAS

    # --- weights ------------------------------------------------------------------------------------------------
    def prepare_linear(self, linear: FactoredLinear) -> Linear:
        paths = []
        for p in linear.paths:
            v_bytes, u_bytes = p.v_signs.view(np.uint8), p.u_signs.view(np.uint8)
            r = p.rank
            # the kernels index tables by these shapes: check them here, not in the inner loop
            if (v_bytes.shape != (r, 4 * ((linear.n + 31) // 32)) or u_bytes.shape != (linear.m, 4 * ((r + 31) // 32))
                    or not (v_bytes.flags.c_contiguous and u_bytes.flags.c_contiguous)):
                raise NQFormatError(f"factored linear ({linear.m}×{linear.n}, rank {r}): sign arrays have shapes "
                                    f"{v_bytes.shape}, {u_bytes.shape}")
            mid = np.ones(r, np.float32) if p.scale_mid is None else p.scale_mid.astype(np.float32)
            if self.simd:
                tiles = (lut16.repack(p.v_signs), lut16.repack(p.u_signs))
            elif self.fixed_linears:
                tiles = (fixed.repack(v_bytes), fixed.repack(u_bytes))
            else:
                tiles = (None, None)
            paths.append(SignPath(v_bytes, u_bytes, p.scale_in.astype(np.float32), mid, p.scale_out.astype(np.float32),
                                  *tiles))
            self._scratch_bytes = max(self._scratch_bytes, v_bytes.shape[1], u_bytes.shape[1])
            self._scratch_rows = max(self._scratch_rows, r, linear.m)
            self._widest = tuple(max(a, b) for a, b in zip(self._widest, (linear.n, r, linear.m)))
        bias = None if linear.bias is None else linear.bias.astype(np.float32)
        lookups = sum(p.v_bytes.size + p.u_bytes.size for p in paths)
        self._max_lookups = max(self._max_lookups, lookups)
        return Linear(linear.m, linear.n, tuple(paths), bias,
                      nk.PARALLEL if self.threads > 1 and lookups >= PARALLEL_MIN_LOOKUPS else nk.SERIAL, lookups)

    def prepare_embedding(self, table: np.ndarray, gtype: GGMLType, hidden: int) -> Table | nt.Q4Table:
        if gtype in (GGMLType.Q4_0, GGMLType.IQ4_NL):
            return nt.q4_table(table, gtype, hidden, self.simd or self.int8_head)
        if gtype == GGMLType.F16:
            return Table(gtype, table.view(np.uint16), None, hidden)
        if gtype == GGMLType.Q8_0:
            return Table(gtype, table, table.view(np.int8), hidden, int8.repack_q8(table) if self.int8_head else None)
        return Table(gtype, table, None, hidden)

    def prepare_factored_table(self, table: FactoredLinear) -> nt.FactoredTable:
        return nt.factored_table(self.prepare_linear(table), table)

    def _buffers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Scratch of the one-token linear (inputs, tables, middle, row sums), allocated once per thread for the widest
        linear: allocating ~200 KB per call would map and page-fault fresh memory every time."""
        local = self._local
        if getattr(local, "scratch", None) is None or local.scratch_size != self._scratch_size():
            nb = self._scratch_size()
            local.scratch_size = nb
            local.scratch = (np.zeros(8 * nb, np.float32), np.zeros(256 * nb, np.float32),
                             np.zeros(8 * nb, np.float32), np.zeros(8 * nb + lut16.TILE, np.float32))
        return local.scratch

    def _scratch_size(self) -> int:
        return max(self._scratch_bytes, (self._scratch_rows + 7) // 8)

    def _fixed_buffers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scratch of the one-token fixed-point linear (a stage's input, its tables, its row sums), once per thread."""
        local = self._local
        sizes = fixed.scratch_sizes(*self._widest)
        if getattr(local, "fixed_sizes", None) != sizes:
            local.fixed_sizes = sizes
            local.fixed = tuple(np.zeros(size, np.float32) for size in sizes)
        return local.fixed

    # --- ops ----------------------------------------------------------------------------------------------------
    def fused_blocks(self, model) -> nd.FusedBlocks | None:
        """Every block of a decoding step in one compiled call (numba_decode.py) where the linears run on the kernels
        that module compiles (LUT-16 with AVX-512, else the fixed-point ones); op by op on LUT-8."""
        fused = self.simd if nd.STAGES == "lut16" else self.fixed_linears
        return nd.FusedBlocks(model, self.threads) if fused else None

    def embed(self, table: Table | nt.Q4Table | nt.FactoredTable | hot_rows.HotRowsTable,
              ids: np.ndarray) -> np.ndarray:
        if isinstance(table, hot_rows.HotRowsTable):
            return hot_rows.embed(self, table, ids)
        out = np.empty((len(ids), table.hidden), np.float32)
        self._rows_into(table, np.ascontiguousarray(ids, dtype=np.int64), out)
        return out

    def _rows_into(self, table: Table | nt.Q4Table | nt.FactoredTable, ids: np.ndarray, out: np.ndarray) -> None:
        """Rows `ids` (int64) of the table as float32, written into out (len(ids), hidden)."""
        if isinstance(table, nt.FactoredTable):
            for i, (u_bytes, v_rows, s_mid, s_out) in enumerate(table.paths):
                nt.embed_factored(u_bytes, v_rows, s_mid, s_out, ids, out, i > 0)
        elif isinstance(table, nt.Q4Table):
            nt.embed_q4(table.raw, table.scales, table.grid, ids, out)
        elif table.gtype == GGMLType.F16:
            nk.embed_f16(table.data, ids, out)
        elif table.gtype == GGMLType.Q8_0:
            nk.embed_q8(table.data, table.qs, ids, out)
        else:
            out[:] = table.data[ids]

    def linear(self, w: Linear, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        t = x.shape[0]
        if self.fixed_linears:
            y = self._fixed_linear(w, x)
        elif t == 1:
            xs, tab, h, sums = self._buffers()
            y = np.empty(w.m, np.float32)
            decode = w.decode if self._parallel() else nk.SERIAL
            for i, p in enumerate(w.paths):
                if self.simd:
                    lut16.binary_path_token(x[0], p.s_in, p.v_tiles, p.s_mid, p.u_tiles, p.s_out, xs, tab, h, sums,
                                            y, i > 0)
                else:
                    decode.binary_path_decode(x[0], p.s_in, p.v_bytes, p.s_mid, p.u_bytes, p.s_out, xs, tab, h, y,
                                              i > 0)
            y = y.reshape(1, w.m)
        elif self.simd:  # LUT-16 per token, tokens over the threads: sign tiles stay in cache for every token
            y = np.empty((t, w.m), np.float32)
            parallel = self._parallel() and t * w.lookups >= PARALLEL_MIN_LOOKUPS
            kernel = lut16.binary_path_parallel if parallel else lut16.binary_path_serial
            for i, p in enumerate(w.paths):
                kernel(x, p.s_in, p.v_tiles, p.s_mid, p.u_tiles, p.s_out, y, i > 0)
        else:
            y = np.empty((t, w.m), np.float32)
            kernel = (nk.PARALLEL if t > nk.LANES and self._parallel() else nk.SERIAL).binary_path_lanes
            for i, p in enumerate(w.paths):
                kernel(x, p.s_in, p.v_bytes, p.s_mid, p.u_bytes, p.s_out, y, i > 0)
        if w.bias is not None:
            y += w.bias
        return y

    def _fixed_linear(self, w: Linear, x: np.ndarray) -> np.ndarray:
        """The product on the fixed-point kernels: one token's tiles over the threads where the linear is large
        enough (as LUT-8's rows), several tokens each alone, tokens over the threads."""
        t = x.shape[0]
        y = np.empty((t, w.m), np.float32)
        if t == 1:
            v, tab, sums = self._fixed_buffers()
            parallel = self._parallel() and w.decode is nk.PARALLEL
            kernel = fixed.path_token_parallel if parallel else fixed.path_token_serial
            for i, p in enumerate(w.paths):
                kernel(x[0], p.s_in, p.v_tiles, p.s_mid, p.u_tiles, p.s_out, v, tab, sums, y[0], i > 0)
            return y
        parallel = self._parallel() and t * w.lookups >= PARALLEL_MIN_LOOKUPS
        kernel = fixed.path_tokens_parallel if parallel else fixed.path_tokens_serial
        for i, p in enumerate(w.paths):
            kernel(x, p.s_in, p.v_tiles, p.s_mid, p.u_tiles, p.s_out, y, i > 0)
        return y

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        shape = x.shape
        x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, shape[-1])
        out = np.empty_like(x2)
        nk.rms_norm(x2, weight, np.float32(eps), out)
        return out.reshape(shape)

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        nk.rope(x, cos, sin, out)
        return out

    def attention(self, cache: KVCache, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int,
                  window: int, scale: float, softcap: float) -> np.ndarray:
        t, heads, d = q.shape
        cache.k[layer, :, pos0:pos0 + t] = k.transpose(1, 0, 2)
        cache.v[layer, :, pos0:pos0 + t] = v.transpose(1, 0, 2)
        out = np.empty((t, heads, d), np.float32)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if gemm_attention.worth_it(t, pos0, window):
            gemm_attention.attention(self._blas, q, cache.k[layer], cache.v[layer], pos0, window, scale, softcap, out)
        else:
            work = t * (pos0 + t) * heads
            kernels = nk.PARALLEL if self._parallel() and work >= PARALLEL_MIN_ATTENTION else nk.SERIAL
            kernels.attention(q, cache.k[layer], cache.v[layer], pos0, window, np.float32(scale), np.float32(softcap),
                              out)
        return out.reshape(t, heads * d)

    def attention_batch(self, caches: list[KVCache], layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                        counts: np.ndarray, positions: np.ndarray, window: int, scale: float,
                        softcap: float) -> np.ndarray:
        """Every sequence in one kernel call (a call per sequence and layer costs more than a short decode
        attention), unless one of them has a prompt slice long enough for the BLAS path."""
        if len(caches) == 1 or any(gemm_attention.worth_it(int(n), int(p), window) for n, p in zip(counts, positions)):
            return super().attention_batch(caches, layer, q, k, v, counts, positions, window, scale, softcap)
        t, heads, d = q.shape
        seq = np.repeat(np.arange(len(caches)), counts)
        pos = np.concatenate([np.arange(p, p + n) for p, n in zip(positions, counts)])
        keys, values = self._cache_lists(caches)
        out = np.empty((t, heads, d), np.float32)
        work = int(((pos + 1) * heads).sum())
        kernels = nk.PARALLEL if self._parallel() and work >= PARALLEL_MIN_ATTENTION else nk.SERIAL
        kernels.attention_batch(np.ascontiguousarray(q, dtype=np.float32), k, v, seq, pos, keys, values, layer, window,
                                np.float32(scale), np.float32(softcap), out)
        return out.reshape(t, heads * d)

    def _cache_lists(self, caches: list[KVCache]) -> tuple[List, List]:
        """The caches' key and value arrays as numba typed lists, rebuilt only when this thread's set of caches
        changes (a step's layers all use the same ones; building them costs more than a layer's attention)."""
        held = getattr(self._local, "lists", None)
        if held is None or len(held[0]) != len(caches) or any(a is not b for a, b in zip(held[0], caches)):
            held = self._local.lists = (list(caches), List([c.k for c in caches]), List([c.v for c in caches]))
        return held[1], held[2]

    def step_threads(self, tokens: int, sequences: int) -> int:
        """A step whose products would all run serially (few tokens: see PARALLEL_MIN_LOOKUPS) splits its sequences
        over the threads instead, at least STEP_SPLIT_MIN_SEQUENCES per thread; the kernels release the GIL, so each
        thread's blocks run on its own core while the other's Python runs."""
        if tokens * self._max_lookups >= PARALLEL_MIN_LOOKUPS:
            return 1
        return max(1, min(self.threads, sequences // STEP_SPLIT_MIN_SEQUENCES))

    @contextmanager
    def one_thread(self) -> Iterator[None]:
        """Within: this thread's ops use the serial kernels (it is one of a split step's threads)."""
        self._local.serial = True
        try:
            yield
        finally:
            self._local.serial = False

    def _parallel(self) -> bool:
        return self.threads > 1 and not getattr(self._local, "serial", False)

    def glu(self, gate: np.ndarray, up: np.ndarray, activation: str) -> np.ndarray:
        out = np.empty_like(gate)
        nk.glu(gate, up, activation == "gelu_tanh", out)
        return out

    def head(self, table: Table | nt.Q4Table | nt.FactoredTable | hot_rows.HotRowsTable, x: np.ndarray) -> np.ndarray:
        if isinstance(table, hot_rows.HotRowsTable):
            if not (self.int8_head and self._int8_table(table.cold) and self._int8_table(table.hot)):
                return hot_rows.head(self, table, x)
            out = np.empty((x.shape[0], len(table.is_hot)), np.float32)  # each part writes its tokens' columns
            x = np.ascontiguousarray(x, dtype=np.float32)
            self._head_int8(table.cold, x, out, table.cold_ids)
            return self._head_int8(table.hot, x, out, table.hot_ids)
        if isinstance(table, nt.FactoredTable):
            return self.linear(table.linear, x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.int8_head and self._int8_table(table):
            return self._head_int8(table, x)
        if x.shape[0] >= gemm_head.MIN_TOKENS:
            vocab = (table.raw if isinstance(table, nt.Q4Table) else table.data).shape[0]
            return gemm_head.head(self._blas, lambda ids, rows: self._rows_into(table, ids, rows), vocab, x)
        if isinstance(table, nt.Q4Table):
            out = np.empty((x.shape[0], table.raw.shape[0]), np.float32)
            if table.tiles is not None:
                (lut16.head_q4_parallel if self.threads > 1 else lut16.head_q4_serial)(*table.tiles, table.grid, x, out)
            else:
                kernels = nt.PARALLEL if self.threads > 1 else nt.SERIAL
                kernels.head_q4(table.raw, table.scales, table.grid, table.codes, x, out)
            return out
        out = np.empty((x.shape[0], table.data.shape[0]), np.float32)
        if table.gtype == GGMLType.F16:
            dots = nk.DOT_TOKENS // 2 <= x.shape[0] <= HEAD_DOTS_MAX_TOKENS
            (self.rows.head_f16_dots if dots else self.rows.head_f16)(table.data, x, out)
        elif table.gtype == GGMLType.Q8_0:
            self.rows.head_q8(table.data, table.qs, x, out)
        else:
            self.rows.head_f32(table.data, x, out)
        return out

    @staticmethod
    def _int8_table(table: Any) -> bool:
        """Whether the int8 head serves this table: a 4-bit one, or Q8_0 with its repacked tiles."""
        return isinstance(table, nt.Q4Table) or (isinstance(table, Table) and table.tiles is not None)

    def _head_int8(self, table: Table | nt.Q4Table, x: np.ndarray, out: np.ndarray | None = None,
                   columns: np.ndarray = int8.ALL_ROWS) -> np.ndarray:
        """The head of a 4-bit or Q8_0 table with x quantized to int8 per block (numba_int8.py), for any number of
        tokens; into `out` at `columns` (a hot-row table's part) when given."""
        q4 = isinstance(table, nt.Q4Table)
        rows = (table.raw if q4 else table.data).shape[0]
        if out is None:
            out = np.empty((x.shape[0], rows), np.float32)
        parallel = self.threads > 1 and rows * x.shape[0] >= HEAD_PARALLEL_MIN_ROWS
        (int8.head_parallel if parallel else int8.head_serial)(*table.tiles, table.lut if q4 else int8.NO_LUT, x, out,
                                                                 q4, columns)
        return out
