"""The cuda backend: the kernels of runtime/kernels on one NVIDIA GPU through CuPy, behind the Backend interface,
plus `GraphDecoder`, which runs runtime/model.py's one-token forward as a CUDA graph captured once and replayed
for every later token.

Weights move to the device once, at prepare time: sign matrices are repacked by a kernel into the fragment order
the tensor-core kernels read (runtime/kernels/binary.cu), scales become float32, embedding tables stay as stored
(F16, F32, Q8_0, Q4_0 or IQ4_NL bytes, a table with hot rows as its two parts; a binary-factored table is a
factored linear for the head and a float32 copy for the embedding). Activations and the KV cache are float32. A
one-token linear is one launch (`binary_gemv`); several tokens (prefill) run `binary_gemm` twice per path.

Everything that touches the GPU goes through a `Device` (CuPy here); the tests run this same module on an
emulating device whose kernels are numpy transliterations of the CUDA sources.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from nqfmt.keys import GGMLType

from nqfmt import FactoredLinear, ModelConfig, NQFormatError, unpack_signs
from nqfmt.layout import cold_ids

from .. import kernels
from ..errors import NQRunError
from ..sampling import Sampler
from . import Backend, BackendUnavailable

_K = kernels.constants()
TILE_ROWS, CHUNK_COLS, BLOCK_TILES = _K["TILE_ROWS"], _K["CHUNK_COLS"], _K["BLOCK_TILES"]
BLOCK_ROWS = TILE_ROWS * BLOCK_TILES  # rows of one binary-linear block (and columns of one digit chunk)
DIGIT_WORDS, MAX_KSPLIT = _K["DIGIT_WORDS"], _K["MAX_KSPLIT"]
ATT_THREADS, ATT_WARPS, ATT_MAX_DIM = _K["ATT_THREADS"], _K["ATT_WARPS"], _K["ATT_MAX_DIM"]
SELECT_THREADS, SORT_SIZE, TOPK = _K["SELECT_THREADS"], _K["SORT_SIZE"], _K["TOPK"]
GEMM_TOKENS = _K["GEMM_TOKENS"]  # tokens per binary_gemm block (blockIdx.y)
CHUNKS_PER_WARP = 4  # binary_gemv splits a block's columns over up to MAX_KSPLIT warps, about this many chunks each
ARGMAX_BLOCKS = 64
THREADS = 256  # elementwise kernels


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


i32, i64, f32 = np.int32, np.int64, np.float32


class Device:
    """CuPy on the current GPU: kernels compiled at first use (NVRTC, cached on disk by CuPy), launched on the
    current stream."""

    def __init__(self) -> None:
        import cupy
        self.xp = cupy
        self._module = None
        self.name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()

    def _kernel(self, name: str):
        if self._module is None:
            module = self.xp.RawModule(code=kernels.source(), options=kernels.OPTIONS,
                                       name_expressions=kernels.name_expressions())
            try:
                module.compile()
            except Exception as e:  # CuPy's compile errors carry NVRTC's log; a missing NVRTC is an OSError/ImportError
                raise BackendUnavailable(f"backend 'cuda': the kernels did not compile ({str(e).splitlines()[0]}); "
                                         "NVRTC comes with pip install 'nanoquant[cuda]'") from None
            self._module = module
        return self._module.get_function(name)

    def launch(self, name: str, grid: int | tuple[int, ...], block: int, args: tuple, shared_mem: int = 0) -> None:
        grid = grid if isinstance(grid, tuple) else (grid,)
        self._kernel(name)(grid, (block,), args, shared_mem=shared_mem)

    def to_device(self, a: np.ndarray) -> Any:
        return self.xp.asarray(np.ascontiguousarray(a))

    def to_host(self, a: Any) -> np.ndarray:
        return self.xp.asnumpy(a)

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        """`step`'s launches as a CUDA graph; the returned function replays it on the current stream. `step` must
        have run once already (kernels loaded) and must neither allocate nor synchronize."""
        cp = self.xp
        stream = cp.cuda.Stream(non_blocking=True)
        cp.cuda.get_current_stream().synchronize()
        with stream:
            stream.begin_capture(mode=cp.cuda.runtime.streamCaptureModeRelaxed)
            try:
                step()
            finally:
                graph = stream.end_capture()
        return lambda: graph.launch(cp.cuda.get_current_stream())

    def memory_reserved(self) -> int:
        """Bytes CuPy's pool holds on the device (its high-water mark: the pool does not give memory back)."""
        return self.xp.get_default_memory_pool().total_bytes()


# --- prepared weights ---------------------------------------------------------------------------------------------
@dataclass
class DeviceLinear:
    """One factored linear in fragment order. Stage 1 stacks the paths' V rows, each path padded to a multiple
    of BLOCK_ROWS (seg[p] is path p's first block of BLOCK_ROWS rows); stage 2 concatenates the paths' U columns
    in the same blocks, so h's index in stage 2 is its stacked row in stage 1."""

    m: int
    n: int
    ranks: tuple[int, ...]
    seg: tuple[int, ...]
    k1_chunks: int
    a1: Any  # (blocks1·BLOCK_TILES, k1_chunks, 32) uint32
    a2: Any  # (blocks2·BLOCK_TILES, k2_chunks, 32) uint32
    s_in: Any  # (paths, n) float32
    s_mid: Any  # (blocks1·BLOCK_ROWS,) float32, zero on padding rows
    s_out: Any  # (paths, m) float32
    bias: Any | None
    seg_dev: Any  # seg as int32 on the device
    counters: Any  # 4 int32: binary_gemv's tickets and phase counts
    ksplit: int  # warps per tile in binary_gemv

    @property
    def paths(self) -> int:
        return len(self.ranks)

    @property
    def k2_chunks(self) -> int:
        return self.seg[-1]

    @property
    def blocks2(self) -> int:
        return _ceil(self.m, BLOCK_ROWS)


@dataclass(frozen=True)
class DeviceTable:
    """An embedding / head table as stored (rows of bytes), the tables.cuh reader for its type, and which tokens its
    rows are: every token in order, or one part of a table with hot rows (spec/FORMAT.md §3.4)."""

    data: Any  # (rows, row_bytes) uint8
    gtype: GGMLType
    vocab: int
    hidden: int
    reader: str
    block: int
    row_of: Any  # (vocab,) int32: each token's row here, -1 where the table's other part holds it
    col_of: Any  # (rows,) int32: the token of each row

    @property
    def n_rows(self) -> int:
        return self.data.shape[0]


@dataclass(frozen=True)
class DeviceHotTable:
    """A 4-bit table with hot rows (spec/FORMAT.md §3.4) as its two parts, the other rows and the hot rows, each a
    DeviceTable over the whole vocabulary: the embedding and the head run one launch per part, each writing only
    its own tokens' rows or logits."""

    cold: DeviceTable
    hot: DeviceTable

    @property
    def vocab(self) -> int:
        return self.cold.vocab

    @property
    def hidden(self) -> int:
        return self.cold.hidden


@dataclass(frozen=True)
class DeviceFactoredTable:
    """A binary-factored embedding / head (spec/FORMAT.md §3.4): the head is `linear` (binary_gemv / binary_gemm
    with m = vocabulary); the embedding reads `rows`, the table expanded once at load to float32 on the device
    (V·d·4 bytes), through the F32 row reader."""

    linear: DeviceLinear
    rows: DeviceTable

    @property
    def vocab(self) -> int:
        return self.linear.m

    @property
    def hidden(self) -> int:
        return self.linear.n


AnyTable = DeviceTable | DeviceHotTable | DeviceFactoredTable


def _parts(table: DeviceTable | DeviceHotTable) -> tuple[DeviceTable, ...]:
    return (table.cold, table.hot) if isinstance(table, DeviceHotTable) else (table,)


class DeviceKVCache:
    """Keys and values of every layer on the device, float32 (layer, kv_head, position, head_dim)."""

    def __init__(self, xp: Any, config: ModelConfig, n_ctx: int) -> None:
        shape = (config.n_layers, config.n_kv_heads, n_ctx, config.head_dim)
        self.k, self.v = xp.zeros(shape, np.float32), xp.zeros(shape, np.float32)
        self.n_ctx = n_ctx

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class CudaBackend(Backend):
    name = "cuda"
    dtype = np.dtype(np.float32)
    jit = True

    def __init__(self, device: Any | None = None) -> None:
        self.device = device or Device()
        self.xp = self.device.xp
        self._pos = self.xp.zeros(1, np.int32)  # the position eager attention reads
        self._xb = self._hb = None  # binary_gemv's digit scratch, sized for the largest linear
        self._xb_words = self._hb_words = 0

    def _launch(self, name: str, grid, block: int, *args, shared_mem: int = 0) -> None:
        self.device.launch(name, grid, block, args, shared_mem)

    # --- weights ------------------------------------------------------------------------------------------------
    def prepare_linear(self, linear: FactoredLinear) -> DeviceLinear:
        xp, m, n = self.xp, linear.m, linear.n
        ranks = tuple(p.rank for p in linear.paths)
        blocks = [_ceil(r, BLOCK_ROWS) for r in ranks]
        seg = tuple(int(s) for s in np.concatenate([[0], np.cumsum(blocks)]))
        k1 = _ceil(n, CHUNK_COLS)
        k2 = seg[-1]
        blocks2 = _ceil(m, BLOCK_ROWS)
        a1 = xp.zeros(seg[-1] * BLOCK_TILES * k1 * 32, np.uint32)
        a2 = xp.zeros(blocks2 * BLOCK_TILES * k2 * 32, np.uint32)
        s_mid = np.zeros(seg[-1] * BLOCK_ROWS, np.float32)
        for p, path in enumerate(linear.paths):
            r = path.rank
            if path.v_signs.shape != (r, _ceil(n, 32)) or path.u_signs.shape != (m, _ceil(r, 32)):
                raise NQFormatError(f"factored linear ({m}×{n}, rank {r}): sign arrays have shapes "
                                    f"{path.v_signs.shape}, {path.u_signs.shape}")
            self._repack(path.v_signs, r, n, a1[seg[p] * BLOCK_TILES * k1 * 32:], k1, 0)
            self._repack(path.u_signs, m, r, a2, k2, seg[p])
            s_mid[seg[p] * BLOCK_ROWS:seg[p] * BLOCK_ROWS + r] = 1.0 if path.scale_mid is None else path.scale_mid
        dev = self.device.to_device
        s_in = dev(np.stack([p.scale_in.astype(np.float32) for p in linear.paths]))
        s_out = dev(np.stack([p.scale_out.astype(np.float32) for p in linear.paths]))
        bias = None if linear.bias is None else dev(linear.bias.astype(np.float32))
        ksplit = int(min(MAX_KSPLIT, max(1, max(k1, k2) // CHUNKS_PER_WARP)))
        self._grow_scratch(len(ranks) * k1 * DIGIT_WORDS, k2 * DIGIT_WORDS)
        return DeviceLinear(m, n, ranks, seg, k1, a1, a2, s_in, dev(s_mid), s_out, bias,
                            dev(np.asarray(seg, np.int32)), xp.zeros(4, np.int32), ksplit)

    def _repack(self, signs: np.ndarray, rows: int, cols: int, dst: Any, dst_chunks: int, chunk_offset: int) -> None:
        """File-layout signs (rows, ceil(cols/32)) into fragment order at dst (see binary.cu)."""
        src = self.device.to_device(signs.view(np.uint32))
        tiles, chunks = _ceil(rows, TILE_ROWS), _ceil(cols, CHUNK_COLS)
        self._launch("repack_signs", _ceil(tiles * chunks * 32, THREADS), THREADS, src, i32(rows), i32(cols),
                     i32(signs.shape[1]), dst, i32(tiles), i32(chunks), i32(dst_chunks), i32(chunk_offset))

    def _grow_scratch(self, xb_words: int, hb_words: int) -> None:
        if xb_words > self._xb_words or hb_words > self._hb_words:
            self._xb_words, self._hb_words = max(xb_words, self._xb_words), max(hb_words, self._hb_words)
            self._xb = self.xp.zeros(self._xb_words, np.uint32)
            self._hb = self.xp.zeros(self._hb_words, np.uint32)

    def prepare_embedding(self, table: np.ndarray, gtype: GGMLType, hidden: int) -> DeviceTable:
        every = np.arange(table.shape[0])
        return self._device_table(table, gtype, hidden, every, every)

    def prepare_hot_table(self, cold: np.ndarray, gtype: GGMLType, hot_ids: np.ndarray, hot: np.ndarray,
                          vocab: int, hidden: int) -> DeviceHotTable:
        hot_ids = np.asarray(hot_ids, np.int64)
        parts = []
        for rows, part_gtype, tokens in ((cold, gtype, cold_ids(hot_ids, vocab)), (hot, GGMLType.Q8_0, hot_ids)):
            row_of = np.full(vocab, -1, np.int64)
            row_of[tokens] = np.arange(len(tokens))
            parts.append(self._device_table(rows, part_gtype, hidden, row_of, tokens))
        return DeviceHotTable(*parts)

    def _device_table(self, table: np.ndarray, gtype: GGMLType, hidden: int, row_of: np.ndarray,
                      col_of: np.ndarray) -> DeviceTable:
        try:
            reader, block = kernels.table_reader(gtype, hidden)
        except KeyError as e:
            raise NQRunError(f"backend 'cuda': {e.args[0]}") from None
        raw = np.ascontiguousarray(table).view(np.uint8).reshape(table.shape[0], -1)
        dev = self.device.to_device
        return DeviceTable(dev(raw), gtype, len(row_of), hidden, reader, block, dev(row_of.astype(np.int32)),
                           dev(col_of.astype(np.int32)))

    def prepare_factored_table(self, table: FactoredLinear, chunk: int = 8192) -> DeviceFactoredTable:
        rows = np.zeros((table.m, table.n), np.float32)
        for p in table.paths:
            v = unpack_signs(p.v_signs, table.n, np.float32) * p.scale_in.astype(np.float32)
            mid = np.ones(p.rank, np.float32) if p.scale_mid is None else p.scale_mid.astype(np.float32)
            for start in range(0, table.m, chunk):  # U unpacked a chunk of rows at a time: never V×r floats at once
                u = unpack_signs(p.u_signs[start:start + chunk], p.rank, np.float32) * mid
                rows[start:start + chunk] += p.scale_out[start:start + chunk, None].astype(np.float32) * (u @ v)
        return DeviceFactoredTable(self.prepare_linear(table), self.prepare_embedding(rows, GGMLType.F32, table.n))

    def vector(self, values: np.ndarray) -> Any:
        return self.device.to_device(np.asarray(values, dtype=np.float32))

    def decoder(self, model: Any, cache: DeviceKVCache) -> GraphDecoder:
        """The decode step captured once as a CUDA graph and replayed per token (one small copy back per token)."""
        return GraphDecoder(model, cache)

    def kv_cache(self, config: ModelConfig, n_ctx: int) -> DeviceKVCache:
        if config.head_dim > ATT_MAX_DIM:
            raise NQRunError(f"backend 'cuda' supports head_dim up to {ATT_MAX_DIM}, this model has "
                             f"{config.head_dim}; use --backend numba")
        return DeviceKVCache(self.xp, config, n_ctx)

    # --- ops into given outputs (shared by the Backend interface and GraphDecoder) ------------------------------
    def embed_into(self, table: AnyTable, ids: Any, out: Any, scale: float = 1.0) -> None:
        """out (T, hidden) = scale · rows ids (device int32) of the table."""
        tokens = ids.shape[0]
        for part in _parts(table.rows if isinstance(table, DeviceFactoredTable) else table):
            count = tokens * (part.hidden // part.block)
            self._launch(f"embed<{part.reader}>", _ceil(count, THREADS), THREADS, part.data, i64(part.data.shape[1]),
                         part.row_of, i32(part.vocab), ids, i32(tokens), i32(part.hidden), f32(scale), out)

    def gemv_into(self, w: DeviceLinear, x: Any, y: Any) -> None:
        """y (m,) = the linear of one token x (n,): binary_gemv's three phases in one launch."""
        block = 128 * w.ksplit
        blocks0 = _ceil(w.paths * w.k1_chunks * DIGIT_WORDS, block)
        blocks1 = w.k2_chunks
        bias = w.bias if w.bias is not None else y
        self._launch("binary_gemv", blocks0 + blocks1 + w.blocks2, block, x, i32(w.n), w.s_in, i32(w.k1_chunks),
                     w.a1, w.s_mid, w.a2, i32(w.k2_chunks), w.seg_dev, w.s_out, bias, i32(w.bias is not None), y,
                     i32(w.m), i32(w.paths), self._xb, self._hb, w.counters, i32(blocks0), i32(blocks1))

    def gemm_into(self, w: DeviceLinear, x: Any, y: Any) -> None:
        """y (T, m) = the linear of T tokens x (T, n): per path, H = s_mid ⊙ V·(s_in ⊙ x), y (+)= s_out ⊙ U·H."""
        t = x.shape[0]
        ty = _ceil(t, GEMM_TOKENS)
        h = self.xp.empty((t, max(w.ranks)), np.float32)
        for p, r in enumerate(w.ranks):
            s0, s1 = w.seg[p], w.seg[p + 1]
            self._launch("binary_gemm", (_ceil(r, BLOCK_ROWS), ty), 128, x, i32(w.n), i32(t), i32(w.n), w.s_in[p],
                         i32(1), w.a1[s0 * BLOCK_TILES * w.k1_chunks * 32:], i32(w.k1_chunks), i32(w.k1_chunks),
                         i32(0), w.s_mid[s0 * BLOCK_ROWS:], y, i32(0), h, i32(r), i32(r), i32(0))
            bias = w.bias if p == 0 and w.bias is not None else None
            self._launch("binary_gemm", (w.blocks2, ty), 128, h, i32(r), i32(t), i32(r), w.s_out[p], i32(0), w.a2,
                         i32(s1 - s0), i32(w.k2_chunks), i32(s0), w.s_out[p], y if bias is None else bias,
                         i32(bias is not None), y, i32(w.m), i32(w.m), i32(p > 0))

    def rms_norm_into(self, x: Any, weight: Any, eps: float, out: Any) -> None:
        d = x.shape[-1]
        self._launch("rms_norm", x.size // d, 128, x, weight, out, i32(d), f32(eps))

    def rope_table_into(self, pos: Any, inv_freq: Any, tokens: int, cos: Any, sin: Any) -> None:
        half = inv_freq.shape[0]
        self._launch("rope_table", _ceil(tokens * half, THREADS), THREADS, pos, inv_freq, i32(half), i32(tokens),
                     cos, sin)

    def rope_into(self, x: Any, cos: Any, sin: Any, out: Any) -> None:
        t, heads, d = x.shape
        self._launch("rope", _ceil(t * heads * (d // 2), THREADS), THREADS, x, cos, sin, out, i32(t), i32(heads),
                     i32(d))

    def attention_into(self, cache: DeviceKVCache, layer: int, q: Any, k: Any, v: Any, pos: Any, window: int,
                       scale: float, softcap: float, out: Any) -> None:
        """Stores k, v at positions pos[0].. of `layer`, then attention of q (T, heads, d) into out (T, heads·d)."""
        t, heads, d = q.shape
        kv_heads, n_ctx = cache.k.shape[1], cache.n_ctx
        self._launch("kv_store", _ceil(t * kv_heads * d, THREADS), THREADS, k, v, cache.k, cache.v, i32(layer), pos,
                     i32(t), i32(kv_heads), i32(d), i32(n_ctx))
        self._launch("attention", t * heads, ATT_THREADS, q, cache.k, cache.v, i32(layer), pos, i32(heads),
                     i32(kv_heads), i32(d), i32(n_ctx), i32(window), f32(scale), f32(softcap), out,
                     shared_mem=4 * ATT_WARPS * d)

    def glu_into(self, gate: Any, up: Any, activation: str, out: Any) -> None:
        gelu = "true" if activation == "gelu_tanh" else "false"
        self._launch(f"glu<{gelu}>", _ceil(gate.size, THREADS), THREADS, gate, up, out, i64(gate.size))

    def head_into(self, table: AnyTable, x: Any, out: Any) -> None:
        if isinstance(table, DeviceFactoredTable):
            (self.gemv_into if x.shape[0] == 1 else self.gemm_into)(table.linear, x, out)
            return
        tokens = x.shape[0]
        for part in _parts(table):
            self._launch(f"head<{part.reader}>", _ceil(part.n_rows * 32, THREADS), THREADS, part.data,
                         i64(part.data.shape[1]), i32(part.n_rows), part.col_of, i32(part.vocab), i32(part.hidden), x,
                         i32(tokens), out)

    # --- the Backend interface ----------------------------------------------------------------------------------
    def embed(self, table: AnyTable, ids: np.ndarray) -> Any:
        ids_dev = self.device.to_device(np.asarray(ids, dtype=np.int32))
        out = self.xp.empty((len(ids), table.hidden), np.float32)
        self.embed_into(table, ids_dev, out)
        return out

    def linear(self, w: DeviceLinear, x: Any) -> Any:
        x = self.xp.ascontiguousarray(x, dtype=np.float32)
        y = self.xp.empty((x.shape[0], w.m), np.float32)
        if x.shape[0] == 1:
            self.gemv_into(w, x, y)
        else:
            self.gemm_into(w, x, y)
        return y

    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any:
        x = self.xp.ascontiguousarray(x, dtype=np.float32)
        out = self.xp.empty_like(x)
        self.rms_norm_into(x, weight, eps, out)
        return out

    def rope(self, x: Any, cos: np.ndarray, sin: np.ndarray) -> Any:
        x = self.xp.ascontiguousarray(x, dtype=np.float32)
        out = self.xp.empty_like(x)
        dev = self.device.to_device
        self.rope_into(x, dev(cos.astype(np.float32)), dev(sin.astype(np.float32)), out)
        return out

    def attention(self, cache: DeviceKVCache, layer: int, q: Any, k: Any, v: Any, pos0: int, window: int,
                  scale: float, softcap: float) -> Any:
        t, heads, d = q.shape
        self._pos.fill(pos0)
        out = self.xp.empty((t, heads * d), np.float32)
        c = self.xp.ascontiguousarray
        self.attention_into(cache, layer, c(q, dtype=np.float32), c(k, dtype=np.float32), c(v, dtype=np.float32),
                            self._pos, window, scale, softcap, out)
        return out

    def glu(self, gate: Any, up: Any, activation: str) -> Any:
        out = self.xp.empty_like(gate)
        self.glu_into(self.xp.ascontiguousarray(gate), self.xp.ascontiguousarray(up), activation, out)
        return out

    def head(self, table: AnyTable, x: Any) -> np.ndarray:
        x = self.xp.ascontiguousarray(x, dtype=np.float32)
        out = self.xp.empty((x.shape[0], table.vocab), np.float32)
        self.head_into(table, x, out)
        return self.device.to_host(out)


# --- decode as a CUDA graph ---------------------------------------------------------------------------------------
class GraphDecoder:
    """One-token decode of a Model on a CudaBackend, as a CUDA graph: runtime/model.py's forward for one token,
    op for op, into buffers allocated here, with the token and position read from device memory. The first step
    of each kind runs directly (loading the kernels); it is then captured once and replayed for every later step.

    The next token is chosen on the device: `greedy` copies one int to the host; `sample` copies the TOPK best
    logits, from which the host's Sampler rules pick (the repetition penalty is applied on the device first).
    """

    def __init__(self, model: Any, cache: DeviceKVCache) -> None:
        from ..model import rope_inv_freq
        self.model, self.cache = model, cache
        be: CudaBackend = model.backend
        self.be, self.xp, cfg = be, be.xp, model.config
        xp, f = self.xp, np.float32
        self.token, self.pos = xp.zeros(1, np.int32), xp.zeros(1, np.int32)
        self.chosen = xp.zeros(1, np.int32)
        d, hd = cfg.hidden, cfg.head_dim
        self.x, self.h, self.o = (xp.zeros((1, d), f) for _ in range(3))
        self.q, self.a = xp.zeros((1, cfg.n_heads, hd), f), xp.zeros((1, cfg.n_heads * hd), f)
        self.k, self.v = xp.zeros((1, cfg.n_kv_heads, hd), f), xp.zeros((1, cfg.n_kv_heads, hd), f)
        self.gate, self.up = xp.zeros((1, cfg.ffn), f), xp.zeros((1, cfg.ffn), f)
        self.logits = xp.zeros((1, cfg.vocab), f)
        self.inv_freq = {local: be.vector(rope_inv_freq(cfg, local)) for local in (False, True)}
        self.rope = {local: (xp.zeros((1, hd // 2), f), xp.zeros((1, hd // 2), f)) for local in (False, True)}
        self.seen = xp.zeros(cfg.vocab, np.uint8)
        self.part_val, self.part_idx = xp.zeros(SORT_SIZE, f), xp.zeros(SORT_SIZE, np.int32)
        self.counter = xp.zeros(1, np.int32)
        self.top_val, self.top_idx = xp.zeros(TOPK, f), xp.zeros(TOPK, np.int32)
        self.penalty = 1.0
        self._scratch = (be._xb, be._hb)  # captured graphs hold these pointers: keep them alive
        self._graphs: dict[str, Callable[[], None]] = {}
        self._ran: set[str] = set()

    max_top_k = TOPK

    # --- the step -------------------------------------------------------------------------------------------------
    def _forward(self) -> None:
        """Model.forward for the one token in self.token at self.pos; logits into self.logits."""
        be, cfg, m, xp = self.be, self.model.config, self.model, self.xp
        from nqfmt import keys as K
        be.embed_into(m.embedding, self.token, self.x, cfg.embedding_scale)
        for local in ({blk.sliding for blk in m.blocks}):
            be.rope_table_into(self.pos, self.inv_freq[local], 1, *self.rope[local])
        for layer, blk in enumerate(m.blocks):
            nrm, lin = blk.norms, blk.linears
            be.rms_norm_into(self.x, nrm[K.ATTN_NORM], cfg.norm_eps, self.h)
            be.gemv_into(lin[K.ATTN_Q], self.h, self.q)
            be.gemv_into(lin[K.ATTN_K], self.h, self.k)
            be.gemv_into(lin[K.ATTN_V], self.h, self.v)
            if cfg.qk_norm:
                be.rms_norm_into(self.q, nrm[K.ATTN_Q_NORM], cfg.norm_eps, self.q)
                be.rms_norm_into(self.k, nrm[K.ATTN_K_NORM], cfg.norm_eps, self.k)
            cos, sin = self.rope[blk.sliding]
            be.rope_into(self.q, cos, sin, self.q)
            be.rope_into(self.k, cos, sin, self.k)
            be.attention_into(self.cache, layer, self.q, self.k, self.v, self.pos,
                              cfg.sliding_window if blk.sliding else 0, cfg.attention_scale, cfg.attn_softcap, self.a)
            be.gemv_into(lin[K.ATTN_OUT], self.a, self.o)
            if cfg.post_norms:
                be.rms_norm_into(self.o, nrm[K.ATTN_POST_NORM], cfg.norm_eps, self.o)
            xp.add(self.x, self.o, out=self.x)
            be.rms_norm_into(self.x, nrm[K.FFN_NORM], cfg.norm_eps, self.h)
            be.gemv_into(lin[K.FFN_GATE], self.h, self.gate)
            be.gemv_into(lin[K.FFN_UP], self.h, self.up)
            be.glu_into(self.gate, self.up, cfg.activation, self.gate)
            be.gemv_into(lin[K.FFN_DOWN], self.gate, self.o)
            if cfg.post_norms:
                be.rms_norm_into(self.o, nrm[K.FFN_POST_NORM], cfg.norm_eps, self.o)
            xp.add(self.x, self.o, out=self.x)
        be.rms_norm_into(self.x, m.output_norm, cfg.norm_eps, self.h)
        be.head_into(m.head_table, self.h, self.logits)
        if cfg.final_softcap > 0:
            c = np.float32(cfg.final_softcap)
            xp.divide(self.logits, c, out=self.logits)
            xp.tanh(self.logits, out=self.logits)
            xp.multiply(self.logits, c, out=self.logits)

    def _greedy(self) -> None:
        self._forward()
        self.be._launch("argmax", ARGMAX_BLOCKS, SELECT_THREADS, self.logits, i32(self.logits.shape[1]),
                        self.part_val, self.part_idx, self.counter, self.chosen)

    def _top(self) -> None:
        self.be._launch("mark_seen", 1, 32, self.seen, self.token, i32(self.logits.shape[1]))
        self._forward()
        vocab = self.logits.shape[1]
        if self.penalty != 1.0:
            self.be._launch("penalize", _ceil(vocab, THREADS), THREADS, self.logits, self.seen, i32(vocab),
                            f32(self.penalty))
        slice_ = max(_ceil(vocab, SORT_SIZE // TOPK), TOPK)
        self.be._launch("topk", _ceil(vocab, slice_), SELECT_THREADS, self.logits, i32(vocab), i32(slice_),
                        self.part_val, self.part_idx, self.counter, self.top_val, self.top_idx)

    def _run(self, kind: str, step: Callable[[], None], token: int, pos: int) -> None:
        if not 0 <= pos < self.cache.n_ctx:
            raise NQRunError(f"position {pos} is outside the context of {self.cache.n_ctx}")
        if not 0 <= token < self.model.config.vocab:
            raise NQRunError(f"token id {token} is outside the model's vocabulary of {self.model.config.vocab}")
        self.token.fill(token)
        self.pos.fill(pos)
        if kind in self._graphs:
            self._graphs[kind]()
        elif kind in self._ran:
            self._graphs[kind] = self.be.device.capture(step)
            self._graphs[kind]()
        else:
            step()
            self._ran.add(kind)

    # --- public steps ---------------------------------------------------------------------------------------------
    def step_logits(self, token: int, pos: int) -> np.ndarray:
        """Run `token` at `pos`; its logits (1, vocab) on the host (for checks, not for speed)."""
        self._run("logits", self._forward, token, pos)
        return self.be.device.to_host(self.logits)

    def greedy(self, token: int, pos: int) -> int:
        """Run `token` at `pos`; the id of the largest logit."""
        self._run("greedy", self._greedy, token, pos)
        return int(self.be.device.to_host(self.chosen)[0])

    def start_sampling(self, context: list[int], repetition_penalty: float) -> None:
        """Marks the context's tokens seen (for the repetition penalty) before sampling steps."""
        self.penalty = float(repetition_penalty)
        seen = np.zeros(self.seen.shape[0], np.uint8)
        seen[np.asarray(context, dtype=np.int64)] = 1
        self.seen[...] = self.be.device.to_device(seen)
        self._graphs.pop("top", None)  # the penalty is part of the captured step
        self._ran.discard("top")

    def sample(self, token: int, pos: int, sampler: Sampler) -> int:
        """Run `token` at `pos` (marking it seen) and draw the next token with `sampler` from the TOPK best logits
        (after the repetition penalty given to start_sampling)."""
        p = sampler.params
        if p.temperature != 0 and not 0 < p.top_k <= TOPK:
            raise NQRunError(f"device sampling needs 1 <= top-k <= {TOPK} (got {p.top_k})")
        self._run("top", self._top, token, pos)
        vocab = self.logits.shape[1]
        k = min(TOPK, vocab)
        ids = self.be.device.to_host(self.top_idx)[:k].astype(np.int64)
        values = self.be.device.to_host(self.top_val)[:k]
        return choose_from_top(sampler, ids, values)


def choose_from_top(sampler: Sampler, ids: np.ndarray, values: np.ndarray) -> int:
    """runtime/sampling.Sampler's draw, given the best logits already sorted (largest first, after any repetition
    penalty): the same temperature, top-k, top-p and min-p steps on the same generator, so with top-k within the
    candidates it picks what the Sampler picks from the full logits."""
    p = sampler.params
    if p.temperature == 0:
        return int(ids[0])
    return sampler.draw(ids[:p.top_k], values[:p.top_k].astype(np.float64) / p.temperature)
