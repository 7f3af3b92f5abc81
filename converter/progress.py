"""Progress reporting for the conversion: a live rich display (stage, block i of N, current loss, elapsed, ETA), or
nothing (tests, libraries)."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class SilentReporter:
    """Receives every event and shows nothing."""

    def stage(self, name: str, total: int) -> None:
        """A new stage starts; `total` steps, or 0 when the first update will say."""

    def block(self, layer: int, n_layers: int) -> None:
        """Block `layer` (0-based) of `n_layers` starts."""

    def advance(self, done: int) -> None:
        """`done` steps of the current stage are finished."""

    def update(self, step: int, total: int, loss: float) -> None:
        """Training step `step` of `total` finished with `loss`."""

    def done(self) -> None:
        """The conversion finished."""

    def close(self) -> None:
        """The conversion stopped (finished or not): release the display."""


Reporter = SilentReporter


class RichReporter(SilentReporter):
    """Two bars: the overall one over blocks (with the whole run's ETA) and the current stage with its loss."""

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console or Console(stderr=True), transient=False)
        self.progress.start()
        self.overall = self.progress.add_task("blocks", total=None, loss="")
        self.current = self.progress.add_task("starting", total=None, loss="")
        self.block_label = ""
        self.started = time.perf_counter()

    def stage(self, name: str, total: int) -> None:
        self.progress.reset(self.current, total=total or None, completed=0,
                            description=f"{self.block_label}{name}", loss="")

    def block(self, layer: int, n_layers: int) -> None:
        self.block_label = f"block {layer + 1}/{n_layers} · " if layer < n_layers else ""
        self.progress.update(self.overall, total=n_layers, completed=layer, description="blocks")

    def advance(self, done: int) -> None:
        self.progress.update(self.current, completed=done)

    def update(self, step: int, total: int, loss: float) -> None:
        self.progress.update(self.current, total=total, completed=step, loss=f"loss {loss:.4g}")

    def done(self) -> None:
        task = self.progress.tasks[self.overall]
        if task.total:
            self.progress.update(self.overall, completed=task.total)
        self.close()

    def close(self) -> None:
        self.progress.stop()


class LineReporter(SilentReporter):
    """Plain timestamped lines (logs, pipes): each stage start, and the loss about every `every` seconds."""

    def __init__(self, stream, every: float = 30.0) -> None:
        self.stream, self.every = stream, every
        self.started = self.last = time.perf_counter()
        self.block_label = ""

    def _line(self, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.stream.write(f"[{elapsed:7.0f}s] {self.block_label}{text}\n")
        self.stream.flush()

    def stage(self, name: str, total: int) -> None:
        self._line(name)

    def block(self, layer: int, n_layers: int) -> None:
        self.block_label = f"block {layer + 1}/{n_layers} · " if layer < n_layers else ""

    def update(self, step: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every or step == total:
            self.last = now
            self._line(f"step {step}/{total} loss {loss:.5g}")

    def done(self) -> None:
        self.block_label = ""
        self._line("done")
