"""Per-process setup of a run: device, seed, logging handlers, and the run record.

These functions change process-wide state (RNG seeds, logging handlers, torch flags), so only entry
points (``train_net.main`` and the per-process worker it launches) call them; nothing here runs at import.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import random
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import CATSEG_ROOT
from .io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [
    "RUN_INFO_FILE",
    "collect_run_info",
    "device_type",
    "git_sha",
    "logging_to",
    "pick_seed",
    "resolve_device",
    "seed_everything",
    "write_run_info",
]

RUN_INFO_FILE = "run_info.json"
_PACKAGES = (
    "semla",
    "torch",
    "torchvision",
    "peft",
    "safetensors",
    "open_clip_torch",
    "timm",
    "numpy",
    "yacs",
)
#: Loggers whose DEBUG records go to ``log.txt`` (the console shows INFO and above).
_DEBUG_LOGGERS = ("cat_seg", "train_net")


def device_type(requested: str) -> str:
    """``cuda``, ``cpu`` or ``mps`` for a ``--device`` / ``MODEL.DEVICE`` value (``auto`` resolved here).

    Raises:
        ValueError: CUDA or MPS requested but not available.
    """
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = requested.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {requested!r} requested (--device or MODEL.DEVICE) but CUDA is not available"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"device {requested!r} requested (--device or MODEL.DEVICE) but MPS is not available"
        )
    if kind not in ("cuda", "cpu", "mps"):
        raise ValueError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    return kind


def resolve_device(requested: str, *, local_rank: int = 0, num_processes: int = 1) -> torch.device:
    """The device of this process.

    Args:
        requested: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        local_rank: this process's rank on the machine (process ``i`` of a CUDA run uses GPU ``i``).
        num_processes: processes on this machine.
    Raises:
        ValueError: the device is not available, or there are fewer GPUs than processes.
    """
    kind = device_type(requested)
    if kind != "cuda":
        return torch.device(kind)
    if num_processes > 1:
        if ":" in requested:
            raise ValueError(
                f"device {requested!r} names one GPU, but {num_processes} processes were asked for"
            )
        if torch.cuda.device_count() < num_processes:
            raise ValueError(
                f"{num_processes} processes need {num_processes} GPUs; {torch.cuda.device_count()} found"
            )
        return torch.device("cuda", local_rank)
    return torch.device(requested if ":" in requested else "cuda")


def pick_seed(seed: int) -> int:
    """``seed`` itself, or a fresh random one when it is negative (detectron2's ``SEED -1``)."""
    return int(seed) if seed >= 0 else int.from_bytes(os.urandom(4), "little") % (2**31)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextmanager
def logging_to(output_dir: str | os.PathLike[str] | None, *, rank: int = 0) -> Iterator[None]:
    """Send log records to the console and (rank 0) to ``<output_dir>/log.txt`` while the block runs.

    The console gets INFO and above on rank 0 and WARNING and above on other ranks; ``log.txt`` also gets
    the DEBUG records of this project's loggers (e.g. every trainable parameter name). The file is
    appended to, so a resumed run continues the same log. Handlers and levels are restored on exit.
    """
    fmt, datefmt = "[%(asctime)s %(name)s %(levelname)s] %(message)s", "%m/%d %H:%M:%S"
    root = logging.getLogger()
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    console.setFormatter(logging.Formatter(prefix + fmt, datefmt))
    handlers.append(console)
    if rank == 0 and output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(output_dir) / "log.txt", mode="a", encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter(fmt, datefmt))
        handlers.append(file_handler)
    old_root_level = root.level
    old_levels = {name: logging.getLogger(name).level for name in _DEBUG_LOGGERS}
    root.setLevel(logging.INFO)
    for name in _DEBUG_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(old_root_level)
        for name, level in old_levels.items():
            logging.getLogger(name).setLevel(level)


def git_sha(repo: str | os.PathLike[str] = CATSEG_ROOT.parent) -> str | None:
    """The commit checked out in ``repo`` (``git rev-parse HEAD``), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def collect_run_info(
    *, argv: Sequence[str], device: torch.device, world_size: int, seed: int, **extra: Any
) -> dict[str, Any]:
    """What a run needs to be reproduced: command, git SHA, package versions, device, seed, ...

    Args:
        argv: the arguments given to ``train_net.main``.
        device: this process's device.
        world_size: number of processes.
        seed: the seed actually used.
        **extra: more entries.
    """
    info: dict[str, Any] = {
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "argv": list(argv),
        "cwd": os.getcwd(),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "device": str(device),
        "cuda": torch.version.cuda,
        "world_size": world_size,
        "seed": seed,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info.update(extra)
    return info


def write_run_info(output_dir: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """Write ``<output_dir>/run_info.json`` atomically."""
    return atomic_write_json(Path(output_dir) / RUN_INFO_FILE, info)
