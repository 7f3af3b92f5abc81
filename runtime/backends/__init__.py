"""Backends: the handful of primitive ops the forward pass needs, behind one small interface.

`runtime/model.py` is written once against `Backend`; each backend owns its weight layout (what `prepare_*` returns
is opaque to the model), its compute dtype and its KV cache. Arrays crossing the interface are the backend's own
array type (numpy here; cupy for a CUDA backend) and support `reshape`, `+`, `*` and indexing.

Backends: `numpy` (float64 reference, slow and obviously correct), `numba` (float32 CPU fast path),
`cuda` (CuPy kernels on an NVIDIA GPU, cuda.py). `auto` picks cuda when CuPy is installed and the driver reports a
GPU (checked without importing CuPy), else numba.
"""
from __future__ import annotations

import mmap
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
from nqfmt.keys import GGMLType

from nqfmt import FactoredLinear, ModelConfig

from ..errors import NQRunError

BACKENDS = ("auto", "numpy", "numba", "cuda")


class BackendUnavailable(NQRunError):
    """The named backend cannot run here (missing package or device); the message says which and how to fix it."""


class KVCache:
    """Keys and values of every layer, laid out (layer, kv_head, position, head_dim) so one head's history is
    contiguous. Backed by anonymous memory maps: pages are zero until written, so a full-context cache costs address
    space, not resident memory, until positions fill. (np.zeros would ask for transparent huge pages on this size,
    and each first write would then zero 2 MB: +360 MB resident and 0.6 s for SmolLM2's first token.)"""

    def __init__(self, config: ModelConfig, n_ctx: int, dtype: np.dtype) -> None:
        shape = (config.n_layers, config.n_kv_heads, n_ctx, config.head_dim)
        count = int(np.prod(shape))
        self._maps = [mmap.mmap(-1, count * np.dtype(dtype).itemsize) for _ in range(2)]
        self.k, self.v = (np.frombuffer(m, dtype=dtype, count=count).reshape(shape) for m in self._maps)
        self.n_ctx = n_ctx

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Backend(ABC):
    """The primitive ops of a decoder forward pass. `x` arguments are (tokens, features) arrays in `dtype`."""

    name: str
    dtype: np.dtype
    jit: bool = False  # kernels compiled (or loaded from a disk cache) on first use
    copies_weights: bool = False  # prepare_linear and a 4-bit table's prepare compute from copies, not the file

    # --- weights ------------------------------------------------------------------------------------------------
    @abstractmethod
    def prepare_linear(self, linear: FactoredLinear) -> Any:
        """Whatever this backend's `linear` needs for one factored linear (views of the file where possible)."""

    @abstractmethod
    def prepare_embedding(self, table: np.ndarray, gtype: GGMLType, hidden: int) -> Any:
        """A dense embedding table / output head as stored (F16, F32, Q8_0 or Q4_0 bytes); never upcast as a whole."""

    def prepare_hot_table(self, cold: np.ndarray, gtype: GGMLType, hot_ids: np.ndarray, hot: np.ndarray,
                          vocab: int, hidden: int) -> Any:
        """A 4-bit table with hot rows (spec/FORMAT.md §3.4): `cold` the other rows' bytes in `gtype`, `hot` the Q8_0
        rows of tokens `hot_ids`. The host backends gather from the two prepared parts (hot_rows.py)."""
        from .hot_rows import hot_rows_table
        return hot_rows_table(self.prepare_embedding(cold, gtype, hidden),
                              self.prepare_embedding(hot, GGMLType.Q8_0, hidden), hot_ids, vocab, hidden)

    @abstractmethod
    def prepare_factored_table(self, table: FactoredLinear) -> Any:
        """A binary-factored embedding table / output head (V×d, spec/FORMAT.md §3.4): `embed` reads its rows,
        `head` applies it as the factored linear it is."""

    def vector(self, values: np.ndarray) -> Any:
        """A small float vector (norm weights) in the compute dtype."""
        return np.ascontiguousarray(values, dtype=self.dtype)

    def kv_cache(self, config: ModelConfig, n_ctx: int) -> KVCache:
        return KVCache(config, n_ctx, self.dtype)

    def decoder(self, model: Any, cache: KVCache) -> Any | None:
        """A one-token decoder that picks the next token where the weights live, or None (the generator then runs
        `model.forward` and samples from the logits on the host). It offers `greedy(token, pos) -> int`,
        `start_sampling(context, repetition_penalty)`, `sample(token, pos, sampler) -> int` and `max_top_k`, the
        largest top-k its `sample` supports."""
        return None

    def step_threads(self, tokens: int, sequences: int) -> int:
        """How many host threads a batched step of `tokens` tokens over `sequences` sequences may split its decoder
        into, each running whole sequences through every block (1: the step runs as one pass). A backend says more
        than 1 only where its ops release the GIL and are thread-safe, and where the step's kernels would otherwise
        run on one thread."""
        return 1

    def one_thread(self) -> AbstractContextManager[None]:
        """A context in which this thread's ops run on it alone (one of a split step's threads, see step_threads)."""
        return nullcontext()

    def fused_blocks(self, model: Any) -> Any | None:
        """A callable f(x, positions, caches) running every decoder block of `model` in one call for B tokens, token
        t at positions[t] of the sequence whose KV cache is caches[t] (x: the embedded tokens (B, hidden); returns
        the last block's outputs), or None: the model then runs its ops one by one. Tokens sharing a cache are a
        prompt's, attending causally to each other. Its `max_tokens` is the most tokens the model hands one call
        beyond one per sequence. Its result equals the op-by-op pass up to float rounding."""
        return None

    # --- ops ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def embed(self, table: Any, ids: np.ndarray) -> Any:
        """Rows `ids` of the embedding table, (T, hidden)."""

    @abstractmethod
    def linear(self, w: Any, x: Any) -> Any:
        """y = Σ_paths s_out ⊙ U·(s_mid ⊙ V·(s_in ⊙ x)) (+ bias), x (T, n) -> (T, m)."""

    @abstractmethod
    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any:
        """x / sqrt(mean(x², last axis) + eps) * weight, over the last axis of a 2- or 3-D array."""

    @abstractmethod
    def rope(self, x: Any, cos: np.ndarray, sin: np.ndarray) -> Any:
        """Rotate-half RoPE (Hugging Face layout) on x (T, heads, head_dim); cos/sin (T, head_dim/2)."""

    @abstractmethod
    def attention(self, cache: KVCache, layer: int, q: Any, k: Any, v: Any, pos0: int, window: int,
                  scale: float, softcap: float) -> Any:
        """Store k, v (T, kv_heads, d) at positions pos0.. of `layer`, then causal GQA attention of q (T, heads, d)
        over positions 0..pos0+T-1 (only the last `window` positions when window > 0); returns (T, heads*d)."""

    def attention_batch(self, caches: list[KVCache], layer: int, q: Any, k: Any, v: Any, counts: np.ndarray,
                        positions: np.ndarray, window: int, scale: float, softcap: float) -> Any:
        """`attention` for several sequences at once: sequence b owns the next counts[b] rows of q, k, v, which run at
        positions positions[b].. over caches[b]; returns (T, heads*d) in the same row order."""
        ends = np.cumsum(counts)
        parts = [self.attention(cache, layer, q[e - n:e], k[e - n:e], v[e - n:e], int(pos), window, scale, softcap)
                 for n, e, pos, cache in zip(counts, ends, positions, caches)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @abstractmethod
    def glu(self, gate: Any, up: Any, activation: str) -> Any:
        """act(gate) * up with act = silu or gelu_tanh."""

    @abstractmethod
    def head(self, table: Any, x: Any) -> np.ndarray:
        """Logits x · tableᵀ, (T, vocab) as a numpy float array."""


def get_backend(name: str = "auto", threads: int | None = None, *, exact: bool = False) -> Backend:
    """Build a backend by name. `threads` caps the CPU threads (None: the machine's cores, at most 4);
    `exact=True` keeps every product in float32 (the numba backend otherwise quantizes the input of a 4-bit or Q8_0
    head to int8 where the CPU has AVX-512 VNNI or AVX2 alone: numba_int8.py)."""
    if name not in BACKENDS:
        raise NQRunError(f"unknown backend {name!r} (choose one of: {', '.join(BACKENDS)})")
    if name == "auto":
        try:
            return _cuda()
        except BackendUnavailable:
            return _numba(threads, exact)
    if name == "numpy":
        from .numpy_ref import NumpyBackend
        return NumpyBackend()
    if name == "numba":
        return _numba(threads, exact)
    return _cuda()


def _numba(threads: int | None, exact: bool) -> Backend:
    from .numba_cpu import NumbaBackend
    return NumbaBackend(threads=threads, exact=exact)


def _cuda() -> Backend:
    """The cuda backend, or BackendUnavailable saying in one line what is missing and how to get it."""
    problem = cuda_problem()
    if problem:
        raise BackendUnavailable(f"backend 'cuda': {problem}; use --backend numba")
    try:
        from .cuda import CudaBackend
        return CudaBackend()
    except Exception as e:  # ImportError, or CuPy's own CUDARuntimeError (say, a driver older than its CUDA)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BackendUnavailable(f"backend 'cuda': CuPy cannot start on this GPU ({first}); reinstall it with "
                                 "pip install 'nanoquant[cuda]'") from None


def cuda_problem() -> str | None:
    """Why the cuda backend cannot run here, or None. Cheap: looks for CuPy without importing it and asks the
    driver library (not CuPy) for the device count."""
    import importlib.util
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'nanoquant[cuda]')"
    devices = _driver_devices()
    if devices is None:
        return "no NVIDIA driver found (libcuda); install the GPU driver"
    if devices == 0:
        return "the NVIDIA driver reports no usable GPU"
    return None


def _driver_devices() -> int | None:
    """GPUs the CUDA driver reports (0 when it fails to initialise), or None when there is no driver library."""
    import ctypes
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value
