"""Progress without a terminal: a log line at least every ``period`` seconds with position, rate and ETA."""

from __future__ import annotations

import logging

import pytest

import cat_seg.progress as progress_module
from cat_seg.progress import format_duration, progress


class FakeClock:
    """time.monotonic() that advances by ``step`` seconds per call."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_log_lines_without_a_terminal(monkeypatch, caplog) -> None:  # noqa: ANN001
    monkeypatch.setattr(progress_module, "is_terminal", lambda: False)
    monkeypatch.setattr(progress_module.time, "monotonic", FakeClock(10.0))  # each item "takes" 10 s
    with caplog.at_level(logging.INFO, logger="cat_seg.progress"):
        items = list(progress(range(10), desc="acdc-rain", unit="img", period=30.0))
    assert items == list(range(10))
    lines = [r.getMessage() for r in caplog.records]
    # start at t=10; items end at t=20, 30, ...; a line once 30 s have passed since the last one, and a final one
    assert lines[0] == "acdc-rain: 3/10 (30%) img, 0.10 img/s, ETA 1:10"
    assert lines[-1] == "acdc-rain: 10/10 (100%) img, 0.09 img/s, done in 1:50"  # the final clock read: t=120
    assert len(lines) == 4


def test_weights_initial_and_disabled(monkeypatch, caplog) -> None:  # noqa: ANN001
    monkeypatch.setattr(progress_module, "is_terminal", lambda: False)
    monkeypatch.setattr(progress_module.time, "monotonic", FakeClock(1.0))
    batches = [[1, 2], [3, 4], [5]]
    with caplog.at_level(logging.INFO, logger="cat_seg.progress"):
        list(progress(batches, total=9, initial=4, weight=len, period=1000.0, desc="x"))
        list(progress(batches, enabled=False, desc="silent"))
    assert [r.getMessage() for r in caplog.records] == ["x: 9/9 (100%) it, 1.25 it/s, done in 4s"]


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (7, "7s"), (65, "1:05"), (3723, "1:02:03")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
