"""The errors a user can fix, shared by both sides of a run (no CLI dependency).

A ``UserError`` carries one line that names the problem and the fix, e.g.
``bucket 'results' does not exist at http://127.0.0.1:9000; create it or fix the URI``.
The command line (``pipeline/cli``) prints it as ``error: ...`` with exit status 2 and adds
any CLI wording (such as "see --help"); library code never mentions the CLI itself.
"""

from __future__ import annotations

__all__ = ["NotFoundError", "UserError", "first_line", "gist"]


class UserError(Exception):
    """A problem with the user's input (a path, a URI, a spec, credentials, a flag...).

    The message is a single line that names the problem and the fix. It is shown without a
    traceback, so it must never contain secrets.
    """


class NotFoundError(UserError, FileNotFoundError):
    """A file, object or directory the user pointed at does not exist.

    Also a ``FileNotFoundError`` so internal callers (resume logic, caches) can catch the
    ordinary exception while the CLI still prints one line.
    """


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if it has none).

    The one place where an exception from a library is cut down to what fits in a one-line error.
    """
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


def gist(exc: BaseException, limit: int = 300) -> str:
    """First and last line of a multi-line message (e.g. a TorchScript error, whose first line says
    only that the interpreter failed and whose last says why); the first line otherwise."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return first_line(exc, limit)
    return f"{lines[0][:limit]} ... {lines[-1][:limit]}"
