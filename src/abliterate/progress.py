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
