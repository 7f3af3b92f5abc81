"""Continuous batching: one thread runs every request in flight, one batched pass over the weights at a time.

Each pass (`Model.step`) carries the next token of every decoding sequence, and the next prompt slice (up to
PREFILL_SLICE tokens) of every sequence still prefilling; each sequence has its own KV cache and positions. A new
request joins at the next pass and its first token is sampled from the logits after its prompt's last slice, so a
long prompt delays the others' next token by one slice at a time, not by its whole prefill. Finished and cancelled
sequences leave between passes. At most `parallel` sequences are active; later requests wait in a FIFO queue.
Results go back through each job's `emit` callback, called on the engine thread.
"""
from __future__ import annotations

import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np

from nqfmt.errors import NQError, one_line
from runtime.backends import KVCache
from runtime.model import Model
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import Tokenizer

from .text_output import TextOutput

PREFILL_SLICE = 64  # prompt tokens a joining sequence runs per pass

@dataclass(frozen=True)
class Piece:
    """Text that is final (may be several tokens, or none for a token that only starts a character)."""

    text: str


@dataclass(frozen=True)
class Done:
    """The generation ended: finish_reason "stop" (a stop token or string) or "length" (max_tokens, or the context
    is full), with the token counts for `usage`."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request could not run (its message is one line for the client)."""

    message: str


Event = Union[Piece, Done, Failed]


@dataclass
class Job:
    """One request: prompt ids (already checked to fit the context), limits, sampling, and where results go."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    emit: Callable[[Event], None]
    cancelled: bool = False


@dataclass
class _Sequence:
    job: Job
    cache: KVCache
    sampler: Sampler
    text: TextOutput
    context: list[int] = field(default_factory=list)  # prompt and generated ids: the cache holds all but the last
    prefilled: int = 0  # prompt tokens already in the cache
    generated: int = 0
    done: bool = False

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.job.prompt)


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, parallel: int, n_ctx: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.parallel, self.n_ctx = parallel, n_ctx
        self._waiting: deque[Job] = deque()
        self._active: list[_Sequence] = []
        self._caches: list[KVCache] = []  # free caches, reused by later sequences
        self._wake = threading.Condition()
        self._stopping = False
        self.dropped = 0  # jobs cancelled before they finished (their client went away)
        self._thread = threading.Thread(target=self._run, name="nqserve-engine", daemon=True)

    # --- called from other threads -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, job: Job) -> None:
        with self._wake:
            self._waiting.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): it leaves at the next step without emitting anything more."""
        job.cancelled = True

    def load(self) -> dict[str, int]:
        return {"active": len(self._active), "waiting": len(self._waiting), "parallel": self.parallel,
                "dropped": self.dropped}

    def warm_up(self) -> None:
        """A pass at each kernel size a batch meets (one prompt slice, four, 2 and 4 decoding rows), so a JIT backend
        loads (or compiles) those kernels before the first request rather than inside it (on threads a slice runs in
        the decoding step's kernels, four slices in the op-by-op ones)."""
        piece = min(PREFILL_SLICE, self.n_ctx)
        for counts in ([piece], [piece] * 4, [1, 1], [1, 1, 1, 1]):
            self.model.step(np.zeros(sum(counts), dtype=np.int64), np.zeros(len(counts), dtype=np.int64),
                            [self.model.new_cache(n) for n in counts], np.array(counts))

    # --- the engine thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._active):
                    self._wake.wait()
                if self._stopping:
                    return
                joining = []
                while self._waiting and len(self._active) + len(joining) < self.parallel:
                    joining.append(self._waiting.popleft())
            for job in joining:
                if job.cancelled:
                    self.dropped += 1
                else:
                    self._active.append(_Sequence(job, self._caches.pop() if self._caches else
                                                  self.model.new_cache(self.n_ctx), Sampler(job.sampling),
                                                  TextOutput(self.tokenizer, job.stop), list(job.prompt)))
            self._leave()
            if self._active:
                self._pass()
                self._leave()

    def _pass(self) -> None:
        """One batched pass: a token for each decoding sequence, a prompt slice for each prefilling one; then the
        next token of every sequence whose prompt is now complete."""
        active = self._active
        runs = [s.job.prompt[s.prefilled:s.prefilled + PREFILL_SLICE] if s.prefilling else s.context[-1:]
                for s in active]
        positions = [s.prefilled if s.prefilling else len(s.context) - 1 for s in active]
        try:
            logits = self.model.step(np.concatenate(runs), np.array(positions), [s.cache for s in active],
                                     np.array([len(r) for r in runs]))
        except Exception as e:  # noqa: BLE001 - the server keeps serving the requests that come next
            for seq in active:
                self._fail(seq, _reason(e))
            return
        for seq, run, row in zip(active, runs, logits):
            if seq.prefilling:
                seq.prefilled += len(run)
                if seq.prefilling:
                    continue
            if not seq.job.cancelled:
                self._advance(seq, row)

    def _advance(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Sample the next token from `logits`, pass on its text, and end the sequence where it should end."""
        token = seq.sampler(logits, seq.context)
        if token in self.tokenizer.stop_ids:
            self._finish(seq, "stop")
            return
        seq.generated += 1
        seq.context.append(token)
        text, stopped = seq.text.push(token)
        if text:
            seq.job.emit(Piece(text))
        if stopped:
            self._finish(seq, "stop", flush=False)
        elif seq.generated >= seq.job.max_tokens or len(seq.context) >= self.n_ctx:
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, reason: str, flush: bool = True) -> None:
        tail = seq.text.finish() if flush else ""
        if tail:
            seq.job.emit(Piece(tail))
        seq.job.emit(Done(reason, len(seq.job.prompt), seq.generated))
        seq.done = True

    def _fail(self, seq: _Sequence, message: str) -> None:
        seq.job.emit(Failed(message))
        seq.done = True

    def _leave(self) -> None:
        """Finished and cancelled sequences leave the batch; their caches go back to the pool."""
        staying = []
        for seq in self._active:
            if seq.done or seq.job.cancelled:
                self.dropped += not seq.done
                self._caches.append(seq.cache)
            else:
                staying.append(seq)
        self._active = staying


def _reason(error: Exception) -> str:
    """A failed request's message: an expected failure's own line; anything else is a bug, whose traceback goes to
    the server's log while the client gets one line."""
    if isinstance(error, NQError):
        return one_line(error)
    traceback.print_exc(file=sys.stderr)
    return f"internal error ({type(error).__name__}); the server's log has the details"
