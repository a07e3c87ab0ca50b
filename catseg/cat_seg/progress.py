"""Progress of long loops: a tqdm bar on a terminal, periodic log lines otherwise.

Without a terminal (a batch job, a pipe, ``nohup``), a progress bar writes nothing useful, so the loop
logs ``<desc>: <done>/<total> (<percent>), <rate>/s, ETA <time>`` at most every ``period`` seconds
(and once at the end), through the module logger of the caller's choice.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["format_duration", "is_terminal", "progress"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


def is_terminal() -> bool:
    """Whether stderr (where tqdm draws) is an interactive terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    """``1:02:03``, ``4:05`` or ``7s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    if minutes:
        return f"{minutes}:{secs:02d}"
    return f"{secs}s"


def progress(
    items: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    period: float = 30.0,
    log: logging.Logger | None = None,
    initial: int = 0,
    weight: Callable[[T], int] | None = None,
) -> Iterator[T]:
    """Iterate over ``items`` while reporting progress.

    Args:
        items: the loop's iterable.
        total: number of units expected (default ``len(items)`` when it has one).
        desc: what the loop does (``"acdc-rain"``, ``"training"``, ...).
        unit: name of one unit (``"img"``, ``"it"``).
        enabled: report at all.
        period: seconds between log lines when stderr is not a terminal.
        log: logger of the log lines (default: this module's).
        initial: units already done before this loop (a resumed run).
        weight: units per item (e.g. ``len`` for batches of images); default 1.
    Yields:
        the items, unchanged.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items) + initial  # type: ignore[arg-type]
    if not enabled:
        yield from items
        return
    if is_terminal():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=initial, desc=desc or None, unit=unit, dynamic_ncols=True)
        try:
            for item in items:
                yield item
                bar.update(weight(item) if weight else 1)
        finally:
            bar.close()
        return
    log = log or logger
    start = last = time.monotonic()
    done = initial
    for item in items:
        yield item
        done += weight(item) if weight else 1
        now = time.monotonic()
        if now - last >= period:
            last = now
            log.info(_line(desc, done, total, initial, now - start, unit))
    if done > initial:
        log.info(_line(desc, done, total, initial, time.monotonic() - start, unit))


def _line(desc: str, done: int, total: int | None, initial: int, elapsed: float, unit: str) -> str:
    rate = (done - initial) / elapsed if elapsed > 0 else 0.0
    where = f"{done}/{total} ({100.0 * done / total:.0f}%)" if total else f"{done}"
    text = f"{desc + ': ' if desc else ''}{where} {unit}, {rate:.2f} {unit}/s"
    if total and rate > 0 and done < total:
        text += f", ETA {format_duration((total - done) / rate)}"
    elif total and done >= total:
        text += f", done in {format_duration(elapsed)}"
    return text
