"""Progress bars for long work: bytes, throughput and ETA on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from contextlib import contextmanager


def progress_factory(quiet: bool = False):
    """A context-manager factory (total_bytes, description) -> advance(nbytes), or None when silent."""
    if quiet or not sys.stderr.isatty():
        return None

    @contextmanager
    def bar(total: int, description: str):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task, n)

    return bar
