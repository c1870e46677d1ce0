"""The one exception type for user errors, and how every command reports them: one line, a non-zero exit."""

from __future__ import annotations

import os
import sys


class SpheroError(ValueError):
    """A problem with the user's input or settings: reported as one line naming the fix, no traceback."""


def report(prefix: str, message: str, exc: BaseException) -> None:
    """Print a user error as one line and exit with status 2 (``exc`` re-raised with its traceback only with
    SPHERO_DEBUG)."""
    print(f"{prefix}: error: {message}", file=sys.stderr)
    if os.environ.get("SPHERO_DEBUG"):
        raise exc
    raise SystemExit(2) from None


def interrupted(prefix: str, what: str) -> None:
    """Ctrl-C: one line saying what was (not) written, exit status 130."""
    print(f"{prefix}: interrupted; {what}", file=sys.stderr)
    raise SystemExit(130) from None


def os_error_message(exc: OSError) -> str:
    """An ``OSError`` (missing folder, permissions, full disk) as one line naming the path."""
    what = exc.strerror or type(exc).__name__
    where = exc.filename if exc.filename is not None else ""
    return f"cannot access {str(where)!r}: {what}" if where else f"{what}: {exc}"
