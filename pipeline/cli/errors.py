"""How the command line reports problems: one line on stderr, exit status 2, no traceback.

Library code raises ``workers.errors.UserError`` with a message that names the problem and the
fix; the commands here print it as ``error: <message>``. Usage errors (a bad flag value) get the
same one-line form plus the command's ``--help`` pointer, the one piece of CLI wording.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import click

from workers.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Command", "Group", "UnexpectedErrorExit", "UserErrorExit", "handle_user_errors"]


class UserErrorExit(click.ClickException):
    """A UserError on its way out of click: printed as ``error: <message>``, exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class UnexpectedErrorExit(UserErrorExit):
    """An error nobody anticipated, reported in one line with exit status 1 (the details are in
    the log file the message names)."""

    exit_code = 1


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


class _OneLineErrors:
    """Usage errors as one line (``error: ... (see 'CMD --help')``), exit status 2, like UserError."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)  # type: ignore[misc]
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)  # type: ignore[misc]
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            message = " ".join(exc.format_message().split())
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if isinstance(exc, click.UsageError) and ctx else ""
            click.echo(f"error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


class Command(_OneLineErrors, click.Command):
    pass


class Group(_OneLineErrors, click.Group):
    pass
