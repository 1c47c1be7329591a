"""Exceptions that the CLI turns into a one-line message and exit status 2."""

from __future__ import annotations


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
