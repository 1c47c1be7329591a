"""Exceptions that the CLI turns into a one-line message and exit status 2."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """A problem with the user's input (a path, a URI, a spec, credentials...).

    The message is a single line that names the problem and the fix, e.g.
    ``bucket 'results' does not exist; create it or fix the --out URI``.
    The CLI prints it without a traceback, so it must never contain secrets.
    """


class NotFoundError(UserError, FileNotFoundError):
    """A file, object or directory the user pointed at does not exist.

    Also a ``FileNotFoundError`` so internal callers (resume logic, caches)
    can catch the ordinary exception while the CLI still prints one line.
    """


class UserErrorExit(click.ClickException):
    """A UserError on its way out of click: printed as ``error: <message>``, exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def handle_user_errors(func: F) -> F:
    """Decorate a click callback so that a UserError ends the command with one line and status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            # One line only: a multi-line message would read like a traceback.
            raise UserErrorExit(" ".join(str(exc).split())) from exc

    return wrapper  # type: ignore[return-value]
