"""The numba backend's threads for work done in numpy's BLAS (prefill attention, the head over many tokens).

Tasks are dealt out in turn to `threads` threads (the caller's and a small pool's), each calling BLAS single-threaded
(threadpoolctl holds it to one thread meanwhile); BLAS and the compiled passes between its calls release the GIL. BLAS's
own threads are not used: they spin while they wait, which starves whatever else holds a core of a small machine.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TypeVar

from threadpoolctl import ThreadpoolController

Task = TypeVar("Task")


@cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


class BlasWorkers:
    """`threads` threads that run a function over shares of a task list, BLAS single-threaded in each."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="nq-blas") if threads > 1 else None

    def run(self, work: Callable[[Sequence[Task]], None], tasks: Sequence[Task]) -> None:
        """work(share) for the shares tasks[w::threads], w < threads, one per thread; returns when all are done."""
        with _blas().limit(limits=1, user_api="blas"):
            if self._pool is None or len(tasks) < 2:
                work(tasks)
                return
            shares = [self._pool.submit(work, tasks[w::self.threads]) for w in range(1, self.threads)]
            work(tasks[::self.threads])
            for share in shares:
                share.result()
