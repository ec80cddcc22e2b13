"""The one-message error path shared by every entry script.

A user's mistake (a bad flag value, a missing file, a malformed record in strict mode, a checkpoint that
does not fit the model) raises `UserError` with a message that says what is wrong, where (file, line,
field) and what to do. Entry scripts run `main` through `run_entry_point`, which prints that message alone
and exits with status 2. Everything else is a bug of ours and keeps its traceback. `LMTRAIN_DEBUG=1` shows
the traceback for user errors too.
"""
from __future__ import annotations

import os
import sys

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(ValueError):
    """A mistake in what the user gave us; printed as one message, without a traceback."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): the part of a library's
    many-line error that goes into one UserError line."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def run_entry_point(main, argv=None):
    """`if __name__ == "__main__": run_entry_point(main)`: one message and a non-zero exit for user errors
    and Ctrl-C, the full traceback for anything else (and for everything with LMTRAIN_DEBUG=1)."""
    debug = os.environ.get("LMTRAIN_DEBUG", "").lower() not in ("", "0", "false", "no")
    try:
        return main(argv)
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
