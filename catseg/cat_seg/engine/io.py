"""Atomic file writes for run outputs (checkpoints, adapters, metrics, configs).

Every output is written to a temporary name in the destination folder and renamed into place, so a
crash or a full disk never leaves a half-written file under the final name, and an existing file is
only replaced by a complete new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write, atomic_write_text, default_file_mode, umask

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
