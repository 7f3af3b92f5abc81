"""nqrun: the standalone runtime for `.nq` files (NanoQuant sub-1-bit models).

It memory-maps the file, validates it, and runs it with numpy / numba (CPU) kernels. It never imports torch or
transformers, so it starts in well under a second.

Library API
-----------
    import runtime

    m = runtime.load("model.nq")     # backend="auto" | "numba" | "numpy" | "cuda", threads=None, n_ctx=None
    print(m.info)                                  # architecture, sizes, bits per weight, backend (a ModelInfo)

    text = m.generate("The capital of France is", max_tokens=32, temperature=0)      # greedy
    for piece in m.stream("Once upon a time", max_tokens=64, temperature=0.8, top_p=0.95, seed=1):
        print(piece, end="", flush=True)
    print(m.stats.decode_tps)                      # figures of the last generation (a GenerationStats)

    reply = m.chat([{"role": "user", "content": "Name three colours."}], max_tokens=64)
    for piece in m.chat_stream(messages): ...

    logits = m.logits([1, 2, 3])                   # numpy array (3, vocab): next-token logits after each position
    ids = m.tokenize("hello"); text = m.detokenize(ids)

Sampling keywords (generate, stream, chat, chat_stream): temperature (0 = greedy; default 0.8), top_k (40; 0 = off),
top_p (0.95; 1 = off), min_p (0.05; 0 = off), repetition_penalty (1.0 = off), seed (None = random); plus
max_tokens and stop (a list of strings that end the generation and are not returned). Generation also ends at the
model's end-of-turn / end-of-text token and when the context is full (`m.stats.stop_reason` says which).

Consecutive calls reuse the KV cache for a shared prompt prefix (a chat's earlier turns are not recomputed).
A LanguageModel runs one generation at a time.

Errors: a malformed file raises `nqfmt.NQFormatError`; a request it cannot serve (prompt longer than the context,
unknown backend, CuPy missing for `cuda`, bad sampling values) raises `runtime.NQRunError`. Both derive from `nqfmt.NQError`.
"""
from __future__ import annotations

import os

from .errors import NQRunError
from .generate import GenerationStats
from .language_model import LanguageModel, ModelInfo

__all__ = ["GenerationStats", "LanguageModel", "ModelInfo", "NQRunError", "load"]


def load(path: str | os.PathLike, backend: str = "auto", threads: int | None = None, n_ctx: int | None = None,
         exact: bool = False, verify: bool = True) -> LanguageModel:
    """Open, validate and prepare a `.nq` file. `threads`: CPU threads (default: cores, at most 4); `n_ctx`: the
    largest context to allow (default: the model's); `exact=True`: every product in float32 (by default the numba
    backend quantizes a 4-bit or Q8_0 head's input to int8 on CPUs with AVX-512 VNNI or AVX2 alone, and on CPUs with
    AVX2 but no AVX-512 rounds the binary linears' inputs to 11-bit fixed point);
    `verify=False`: skip checking every tensor's checksum at load (spec/FORMAT.md §5)."""
    return LanguageModel(path, backend=backend, threads=threads, n_ctx=n_ctx, exact=exact, verify=verify)
