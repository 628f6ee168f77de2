"""Progress bars for long work: bytes, throughput and ETA on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from contextlib import contextmanager


def progress_factory(quiet: bool = False, unit: str = "bytes"):
    """A context-manager factory (total, description) -> advance(n), or None when silent. `unit` is
    "bytes" (sizes and MB/s) or a countable noun such as "tokens" (counts and <unit>/s)."""
    if quiet or not sys.stderr.isatty():
        return None

    @contextmanager
    def bar(total: int, description: str):
        from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn,
                                   TextColumn, TimeRemainingColumn, TransferSpeedColumn)
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else f"? {unit}/s")

        amount = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(), Rate())
        columns = (TextColumn("{task.description}"), BarColumn(), *amount, TimeRemainingColumn())
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task, n)

    return bar
