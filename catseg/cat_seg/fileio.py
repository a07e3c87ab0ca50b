"""Atomic file writes: a temporary file in the destination folder, then a rename.

A crash or a full disk never leaves a half-written file under the final name, and an existing file is
only replaced by a complete new one. Used for every output: configs, checkpoints, adapters, results.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_text", "default_file_mode", "umask"]


def umask() -> int:
    """The process's file-creation mask (read without changing it, where the OS allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def default_file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give a new file (``0o666`` minus the umask)."""
    return 0o666 & ~umask()


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through ``write(binary_file)`` into a temporary file, then rename it to ``path``.

    The file gets the usual permissions (``0o666`` minus the umask), not ``mkstemp``'s private ``0o600``.

    Args:
        path: destination; missing parent folders are created.
        write: called with the open temporary file (binary mode).
    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_yaml(path: str | os.PathLike[str], *, what: str, error: Callable[[str], Exception]) -> object:
    """The content of a YAML file a user gave (``None`` for an empty file).

    Args:
        path: the file.
        what: what the file is, for the messages (``domain spec``, ``SemLA config file``, ...).
        error: builds the exception raised for a file that is not valid YAML (or not UTF-8).
    Raises:
        FileNotFoundError: ``"<what> not found: <path>"``.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid YAML ({e})") from None
