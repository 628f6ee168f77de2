"""The entry point of `python -m gguforge` and of the `gguforge` console script (pyproject.toml).

Its first instruction installs handlers for the termination signals, before the CLI and its heavy
modules are imported (typer, then numpy, gguf ... inside the commands; on a loaded machine that takes
most of a second). A signal in that time prints the CLI's one line and exits 128 + signal at once:
nothing has been written yet, so there is nothing to clean up. `cli.main` then installs its own
handlers for the command (`signals.termination_as_exception`, which unwind and clean up) and puts these
back when the command returns; from then on a signal is ignored, so a command that finished keeps
its exit code. Python's default would print a KeyboardInterrupt traceback (SIGINT) or end the process
without a word (SIGTERM, SIGHUP).
"""

import os
import signal


def _exit_at_start(signum, _frame):
    """Before the command has begun: one line, exit 128 + signal (os._exit: there is nothing to undo)."""
    line = "interrupted\n" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}\n"
    try:
        os.write(2, line.encode())
    except OSError:  # stderr closed: the exit code still says it
        pass
    os._exit(128 + signum)


def _set_handlers(handler) -> None:
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


_set_handlers(_exit_at_start)


def run() -> None:
    from .cli import main
    code = main()
    _set_handlers(signal.SIG_IGN)  # the command is over: a late signal must not change its outcome
    raise SystemExit(code)


if __name__ == "__main__":
    run()
