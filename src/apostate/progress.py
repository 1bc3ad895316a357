"""Rich progress bars with ETA, and the console everything prints to.

Rich allows one live display at a time, so all bars share one Progress: a trial's bar and
a generation bar inside it show together, and each disappears when its work is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)

_progress: Progress | None = None
_open_tasks = 0


@contextmanager
def track(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar; the body calls the yielded function with the amount of work done."""
    global _progress, _open_tasks
    if _progress is None:
        _progress = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,  # logs get the per-trial lines, not bar redraws
        )
        _progress.start()
    progress = _progress
    task = progress.add_task(label, total=total)
    _open_tasks += 1
    try:
        yield lambda amount=1: progress.advance(task, amount)
    finally:
        progress.remove_task(task)
        _open_tasks -= 1
        if _open_tasks == 0:
            progress.stop()
            _progress = None
