"""One error policy for the library and the CLI.

``UsageError`` is bad user input: a flag, a file field or an API argument that is out of range,
malformed or inconsistent. Its message is one line that names the field and says what is valid.
The CLI prints it and exits 2. It subclasses ``ValueError`` so API callers that already catch
``ValueError`` keep working; anything that is *not* a ``UsageError`` is a bug (exit 1, traceback).
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad user input; ``field`` names the flag, file field or argument at fault (if known)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
