"""Termination signals: every catchable one unwinds the stack like Ctrl-C, so cleanup always runs.

The CLI installs `termination_as_exception()` for the whole command (the writer does too, for library
callers, while it writes). SIGINT raises KeyboardInterrupt
(as Python does by default); SIGTERM, SIGHUP and SIGQUIT raise `Terminated`, a BaseException so
that no `except Exception` swallows it. Either way the CLI prints one line and exits 128 + signal.
`deferred()` holds these signals back while a few steps must not be cut in half (moving finished
files into place); they are delivered, and raise, as soon as it ends.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
                            if hasattr(signal, name))


class Terminated(BaseException):
    """A termination signal other than SIGINT arrived."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_unwinding = {"depth": 0, "signal": None}  # the first signal raised; later ones must not cut cleanup short


def _raise_for(signum: int, _frame) -> None:
    if _unwinding["signal"] is not None:
        return  # already unwinding for an earlier signal: let its cleanup and one-line report finish
    _unwinding["signal"] = signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def termination_as_exception() -> Iterator[None]:
    """Within the block, termination signals raise (see the module text); previous handlers come back after."""
    if not _in_main_thread():  # handlers can only be set from the main thread
        yield
        return
    if _unwinding["depth"] == 0:
        _unwinding["signal"] = None
    _unwinding["depth"] += 1
    previous = {}
    try:
        for signum in TERMINATION_SIGNALS:
            previous[signum] = signal.signal(signum, _raise_for)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _unwinding["depth"] -= 1


@contextmanager
def deferred() -> Iterator[None]:
    """Hold termination signals back for the block; one that arrived is handled as it ends."""
    if not _in_main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: caught.append(signum))
                for signum in TERMINATION_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            _deliver(caught[0], previous[caught[0]])


def _deliver(signum: int, handler) -> None:
    """Act on a held-back signal as its handler would have."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)
