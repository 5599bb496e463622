"""A progress bar with an ETA, and the line it leaves behind saying how long the step took."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(console: Console, description: str, total: int) -> Iterator[Callable[..., None]]:
    """A progress bar with ETA; yields a function that advances it."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    started = time.time()
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1, more: int = 0) -> None:
            """Advance by n steps; `more` announces steps the total did not foresee."""
            if more:
                bar.update(task, total=(bar.tasks[task].total or 0) + more)
            bar.advance(task, n)

        yield advance
    console.print(f"  {description}: {time.time() - started:.0f} s")


class Stopwatch:
    """Wall time per stage of a run, laps taken in order: where the time went."""

    def __init__(self) -> None:
        self.started = self._last = time.time()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        """Charge the time since the previous lap to `stage`."""
        now = time.time()
        self.laps[stage] = self.laps.get(stage, 0.0) + now - self._last
        self._last = now

    @property
    def seconds(self) -> float:
        """Time since the start."""
        return time.time() - self.started

    def summary(self) -> str:
        """Each stage's minutes and share of the whole, longest first."""
        total = max(self.seconds, 1e-9)
        parts = sorted(self.laps.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{stage} {s / 60:.1f} min ({s / total:.0%})" for stage, s in parts)
