"""`LanguageModel`: a `.nq` file ready for text in, text out — the object `runtime.load` returns."""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from nqfmt import open_nq

from .backends import get_backend
from .errors import NQRunError
from .generate import GenerationStats, Generator, text_pieces
from .model import Model
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded file is and how it runs."""

    path: str
    name: str
    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    context_length: int
    source_parameters: int
    file_bytes: int
    bits_target: float
    bits_achieved: float
    embedding_type: str
    backend: str
    threads: int | None
    load_seconds: float

    def __str__(self) -> str:
        return (f"{self.name} ({self.arch}, {self.n_layers} layers, hidden {self.hidden}, vocab {self.vocab}, "
                f"context {self.context_length}); {self.bits_achieved:.4f} bpw (target {self.bits_target:g}), "
                f"{self.file_bytes / 2**20:.1f} MiB; backend {self.backend}"
                + (f", {self.threads} threads" if self.threads else ""))


class LanguageModel:
    """A loaded model. Generations run one at a time (they share the KV cache and kernel scratch): one started while
    another thread's runs waits for it; one started while this thread's own stream is still open is refused."""

    def __init__(self, path: str | os.PathLike, backend: str = "auto", threads: int | None = None,
                 n_ctx: int | None = None, exact: bool = False, verify: bool = True) -> None:
        start = time.perf_counter()
        self.file = open_nq(path)
        if verify:
            self.file.verify()
        self.tokenizer = Tokenizer(self.file.tokenizer)
        self.backend = get_backend(backend, threads, exact=exact)
        self.model = Model(self.file, self.backend)
        if self.backend.jit:
            self.model.warm_up()
        self.generator = Generator(self.model, n_ctx)
        self._template = None
        self._turn = threading.Lock()  # held by the generation running now
        self._owner: int | None = None  # the thread it runs in
        self.stats = GenerationStats()
        cfg, prov = self.file.config, self.file.provenance
        self.info = ModelInfo(
            path=str(path), name=self.file.metadata.get("general.name") or prov.source_name, arch=cfg.arch,
            n_layers=cfg.n_layers, hidden=cfg.hidden, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
            vocab=cfg.vocab, context_length=cfg.context_length, source_parameters=prov.source_params,
            file_bytes=self.file.size, bits_target=prov.bits_target, bits_achieved=prov.bits_achieved,
            embedding_type=self.model.embedding_type, backend=self.backend.name,
            threads=getattr(self.backend, "threads", None), load_seconds=time.perf_counter() - start)

    # --- text ---------------------------------------------------------------------------------------------------
    def stream(self, prompt: str | list[int], max_tokens: int = 256, stop: tuple[str, ...] | list[str] = (),
               **sampling) -> Iterator[str]:
        """Text pieces of the continuation of `prompt` (a string, or token ids), as they are generated.
        Sampling keywords: temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty, seed.
        `self.stats` holds the figures once the iterator is exhausted."""
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt, context=self.generator.n_ctx)
        sampler = Sampler(SamplingParams(**sampling))
        return self._pieces(ids, max_tokens, tuple(stop), sampler)

    def _pieces(self, ids: list[int], max_tokens: int, stop: tuple[str, ...], sampler: Sampler) -> Iterator[str]:
        with self._exclusive():
            self.stats = stats = GenerationStats()
            tokens = self.generator.tokens(ids, max_tokens, sampler, self.tokenizer.stop_ids, stats)
            yield from text_pieces(tokens, self.tokenizer, stop, stats)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The model's KV cache and scratch for one generation: waits for another thread's, refuses a second one in
        the thread whose stream is still open (it would wait for itself)."""
        me = threading.get_ident()
        if self._owner == me:
            raise NQRunError("this thread's previous stream is still open; finish or close it before generating "
                             "again (a LanguageModel runs one generation at a time)")
        with self._turn:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def generate(self, prompt: str | list[int], max_tokens: int = 256, stop: tuple[str, ...] | list[str] = (),
                 **sampling) -> str:
        """The whole continuation of `prompt` (see `stream`)."""
        return "".join(self.stream(prompt, max_tokens, stop, **sampling))

    # --- chat ---------------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the file's chat template, ready for the assistant's turn."""
        if self._template is None:
            source = self.file.tokenizer.chat_template
            if not source:
                raise NQRunError("this file has no chat template; use a plain prompt instead")
            from .chat import ChatTemplate
            tok = self.tokenizer
            self._template = ChatTemplate(source, tok.token_text(tok.bos_id), tok.token_text(tok.eos_id))
        # message text is plain text: special-token text in it becomes placeholders while the template renders, and
        # is tokenized as text, so only the template's own special tokens open and close turns
        protected, literals = self.tokenizer.protect(messages)
        limit = self.tokenizer.max_chars(self.generator.n_ctx)
        text = self._template.render(protected, limit=limit)
        ids = self.tokenizer.encode_chat(text, literals)
        # the template writes any BOS itself; add one only if it did not and the model expects it
        if self.tokenizer.add_bos and self.tokenizer.bos_id is not None and ids[:1] != [self.tokenizer.bos_id]:
            ids = [self.tokenizer.bos_id, *ids]
        return ids

    def chat_stream(self, messages: list[dict[str, str]], max_tokens: int = 512,
                    stop: tuple[str, ...] | list[str] = (), **sampling) -> Iterator[str]:
        """The assistant's reply to `messages` ([{"role": "user", "content": ...}, ...]), piece by piece."""
        return self.stream(self.chat_prompt(messages), max_tokens, stop, **sampling)

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 512, stop: tuple[str, ...] | list[str] = (),
             **sampling) -> str:
        """The assistant's whole reply to `messages`."""
        return "".join(self.chat_stream(messages, max_tokens, stop, **sampling))

    # --- numbers ------------------------------------------------------------------------------------------------
    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Next-token logits after every position of `token_ids`, float (len, vocab)."""
        with self._exclusive():
            return self.generator.all_logits([int(t) for t in token_ids])

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
