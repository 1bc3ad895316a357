"""Rich progress bars with ETA, and the console everything prints to.

Rich allows one live display at a time, so all bars share one Progress: a trial's bar and
a generation bar inside it show together, and each disappears when its work is done.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Not a terminal (a log file, a pipe): lines are not wrapped at 80 columns, so each message stays one line.
console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


def warn(message: str) -> None:
    """One warning line: the run goes on, and what it measures may not be what the user meant."""
    console.print(f"[yellow]apostate: warning:[/] {escape(message)}", soft_wrap=True)


def can_ask(headless: bool) -> bool:
    """Whether a run may ask the user: not headless, and a terminal to ask on."""
    return not headless and sys.stdin.isatty()


class ProgressBars:
    """The one live Progress display, started with the first open bar and stopped with the last."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None
        self.open_bars = 0

    @contextmanager
    def track(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar; the body calls the yielded function with the amount of work done."""
        if self.progress is None:
            self.progress = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
                disable=not self.console.is_terminal,  # logs get the per-trial lines, not bar redraws
            )
            self.progress.start()
        progress = self.progress
        task = progress.add_task(label, total=total)
        self.open_bars += 1
        try:
            yield lambda amount=1: progress.advance(task, amount)
        finally:
            progress.remove_task(task)
            self.open_bars -= 1
            if self.open_bars == 0:
                progress.stop()
                self.progress = None


bars = ProgressBars(console)
track = bars.track
