"""Row-chunk streaming on a thread pool: the unit of work of every conversion and quantization.

Work is split into blocks of leading-axis rows of about CHUNK_BYTES (float32) each, so memory is
bounded by the chunks in flight, never by the tensor or the model.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

CHUNK_BYTES = 16 << 20  # float32 bytes of source rows handled per job


def row_chunks(n_rows: int, row_elems: int) -> Iterator[tuple[int, int]]:
    """Ranges of leading-axis rows holding about CHUNK_BYTES of float32 each."""
    step = max(1, CHUNK_BYTES // max(1, row_elems * 4))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def ordered_parallel(jobs, fn: Callable, threads: int, ahead: int) -> Iterator:
    """fn(*job) for each job on a thread pool, results in job order, at most `ahead` in flight."""
    if threads <= 1:
        for job in jobs:
            yield job, fn(*job)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        try:
            for job in jobs:
                pending.append((job, pool.submit(fn, *job)))
                if len(pending) >= ahead:
                    job0, fut = pending.popleft()
                    yield job0, fut.result()
            while pending:
                job0, fut = pending.popleft()
                yield job0, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()
