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
