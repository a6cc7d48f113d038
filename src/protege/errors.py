"""One exception tree for protege.

Every mistake a user can make (a bad file, a bad flag, an unreachable database) raises a
`ProtegeError` whose message says what was expected, what was found, where, and what to do.
The CLI prints it as one line and exits non-zero; no traceback for user mistakes.
"""


class ProtegeError(Exception):
    """Base class of every error protege raises on purpose."""


class ConfigError(ProtegeError):
    """A setting, flag or environment variable is wrong."""


class StoreError(ProtegeError):
    """The trace store cannot be opened, migrated or written."""


class InputError(ProtegeError):
    """A file the user gave us is malformed; the message names file:line and the field."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


class NotFoundError(ProtegeError):
    """A trace, dataset or run id that does not exist."""
