"""One error type for everything a user can cause and fix.

The CLI prints a UserError as one line (plus an optional hint) and exits with
EXIT_BAD_INPUT; anything else is a bug and exits with EXIT_INTERNAL.
"""

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_INTERRUPTED = 130


class UserError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


def not_a_file(path) -> UserError:
    """The error for a path that should name an existing regular file but does not: says what it is."""
    import os
    import stat
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return UserError(f"{path}: no such file")
    except OSError as e:
        return UserError(f"{path}: cannot read ({e.strerror})")
    if stat.S_ISDIR(mode):
        return UserError(f"{path} is a directory, not a file")
    return UserError(f"{path} is not a regular file")
