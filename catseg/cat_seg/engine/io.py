"""Atomic file writes for run outputs (checkpoints, adapters, metrics, configs).

Every output is written to a temporary name in the destination folder and renamed into place, so a
crash or a full disk never leaves a half-written file under the final name, and an existing file is
only replaced by a complete new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "append_jsonl",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "default_file_mode",
    "to_json",
    "umask",
]


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


def to_json(value: Any) -> Any:
    """Make a value JSON-friendly: tensors and numpy scalars to Python numbers, paths to strings.

    NaN and infinities are kept (Python's ``json`` writes them as ``NaN`` / ``Infinity``), matching the
    evaluator's convention for undefined per-class values.
    """
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_json(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(to_json(data), indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` atomically (the object must be loadable with ``weights_only=True``)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one JSON object as a line (a crash can at worst leave a truncated last line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(to_json(record)) + "\n")
        f.flush()
