"""What the benchmark scripts share: the description of the machine and the run in their results.

The scripts run as ``python bench/<script>.py`` (their folder first on ``sys.path``), so they import this
module as ``_common``. It imports nothing heavy at module level: ``bench/startup.py`` measures import times
and does not import torch itself.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def run_description(
    argv: Sequence[str] | None, *, device: str | None = None, cpu_count: bool = False
) -> dict[str, Any]:
    """The machine, the software and the command of a benchmark run, for its results' metadata.

    Args:
        argv: the arguments the script's ``main`` was given (None: ``sys.argv[1:]``), for ``command``.
        device: the device the run used; when given, the torch version, the device and torch's thread
            count come first (``torch``, ``device``, ``threads``; imports torch).
        cpu_count: also record ``os.cpu_count()``.
    Returns:
        ``{"torch", "device", "threads",`` (with ``device``) ``"machine", "cpu_count",`` (with ``cpu_count``)
        ``"python", "date", "command"}``, in this order.
    """
    description: dict[str, Any] = {}
    if device is not None:
        import torch

        description.update(torch=torch.__version__, device=device, threads=torch.get_num_threads())
    description["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    if cpu_count:
        description["cpu_count"] = os.cpu_count()
    description["python"] = platform.python_version()
    description["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    description["command"] = "python " + " ".join(
        [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    )
    return description


def report(results: dict, render: Callable[[dict], str], output: Path | None) -> int:
    """Print a benchmark's markdown table (``render(results)``) and, with ``--output``, write its JSON."""
    import json

    print(render(results))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2))
    return 0


def log(message: str) -> None:
    """A progress line on stderr, with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that a timer stops when the work is done."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median_ms(samples: Sequence[float]) -> float:
    """The median of ``samples`` (seconds), in milliseconds."""
    return 1000 * statistics.median(samples)
