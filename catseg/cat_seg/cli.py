"""What every command-line entry point does with errors: one clear line on stderr, a non-zero exit.

The project's own errors (bad config, dataset file, adapter, statistics, checkpoint, missing file, ...)
are ``ValueError``/``KeyError``/``OSError`` subclasses whose message names the file or key and says what
is wrong; a user needs that message, not a Python traceback. ``--debug`` re-raises them so the
traceback is shown. Anything else (a bug, an out-of-memory error) keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["USER_ERRORS", "add_debug_flag", "error_message", "report_errors"]

#: Exceptions whose message is the whole story for the user.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

_WORKER_PREFIX = "Caught "  # torch.utils.data re-raises worker errors with the worker's traceback text


def error_message(error: BaseException) -> str:
    """The user-facing message of an error.

    A ``KeyError`` keeps its text unquoted. An error re-raised by a ``DataLoader`` from one of its worker
    processes carries the worker's whole traceback in its message; only the last line (the original
    message) is kept.
    """
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if message.startswith(_WORKER_PREFIX) and "\nOriginal Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        name, sep, rest = last.partition(": ")
        message = rest if sep and name.split(".")[-1].isidentifier() else last
    return message or type(error).__name__


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug``: show the Python traceback of errors instead of a one-line message."""
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of errors (default: one-line message)"
    )


def report_errors(prog: str, body: Callable[[], int], *, debug: bool = False) -> int:
    """Run ``body`` and turn user errors into ``<prog>: error: <message>`` on stderr.

    Args:
        prog: the command's name, prefixed to the message.
        body: the command's work; returns the exit status.
        debug: re-raise instead (the traceback is printed).
    Returns:
        ``body()``'s status; 1 after a user error, 130 after Ctrl-C.
    """
    try:
        return body()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"{prog}: error: {error_message(e)}", file=sys.stderr, flush=True)
        return 1
