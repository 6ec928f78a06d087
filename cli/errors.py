"""Turning what a command raised into one line for a person."""

from __future__ import annotations

from protocol.errors import ColoniesError


class UsageError(Exception):
    """Bad command-line usage: reported as one line, exit status 2. (Here, not in cli.main,
    so command modules that cli.main loads raise the class it catches, also when cli.main
    runs as __main__.)"""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def first_error(exc: BaseException) -> BaseException:
    """trio wraps errors from nurseries in groups; the user wants the one that matters."""
    while isinstance(exc, BaseExceptionGroup):
        colonies = [e for e in exc.exceptions if _contains_colonies_error(e)]
        exc = colonies[0] if colonies else exc.exceptions[0]
    return exc


def _contains_colonies_error(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_contains_colonies_error(e) for e in exc.exceptions)
    return isinstance(exc, ColoniesError)


def describe(exc: BaseException) -> str:
    exc = first_error(exc)
    if isinstance(exc, ColoniesError):
        return f"{exc.message} ({exc.status})" if exc.status != 400 else exc.message
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"
