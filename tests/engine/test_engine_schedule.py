"""LR schedules against hand-computed values (detectron2 semantics) and the scheduler's bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
from engine_testlib import TINY_CONFIG

from cat_seg.config import load_config
from cat_seg.engine.schedule import LRScheduler, build_lr_schedule, build_lr_scheduler, lr_at


def _cfg(*opts: str):  # noqa: ANN202
    return load_config(TINY_CONFIG, list(opts))


def test_warmup_cosine_of_the_tiny_config() -> None:
    """BASE_LR 1e-3, MAX_ITER 20, linear warm-up over 2 iterations from 0.01, cosine to 0.

    With c(w) = 0.5 * (1 + cos(pi * w)) and the warm-up segment w < 2 / 20 = 0.1:
    i=0: 0.01 (warm-up start); i=1: 0.5 * 0.01 + 0.5 * c(0.1) = 0.005 + 0.5 * 0.9755282581 (detectron2
    interpolates towards the cosine's value at the end of warm-up); i=2: c(0.1); i=10: c(0.5) = 0.5;
    i=19: c(0.95) = 0.5 * (1 - 0.9876883406).
    """
    cfg = _cfg()
    expected = {0: 1e-5, 1: 4.9276412907e-4, 2: 9.7552825815e-4, 10: 5e-4, 19: 6.1558297e-6}
    for iteration, lr in expected.items():
        assert lr_at(cfg, iteration) == pytest.approx(lr, rel=1e-8), iteration


def test_warmup_cosine_constant_warmup_and_end_value() -> None:
    cfg = _cfg("SOLVER.WARMUP_METHOD", "constant")
    assert [lr_at(cfg, i) for i in (0, 1)] == pytest.approx([1e-5, 1e-5])
    assert lr_at(cfg, 2) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.1)))
    cfg = _cfg("SOLVER.BASE_LR_END", "1e-4")  # end value 0.1: c'(w) = 0.1 + 0.45 * (1 + cos(pi * w))
    assert lr_at(cfg, 10) == pytest.approx(5.5e-4)
    assert lr_at(cfg, 0) == pytest.approx(1e-5)  # warm-up starts from WARMUP_FACTOR * c'(0) = 0.01
    cfg = _cfg("SOLVER.WARMUP_ITERS", "0")
    assert lr_at(cfg, 0) == pytest.approx(1e-3)


def test_warmup_multistep() -> None:
    """STEPS (5, 10), GAMMA 0.1: factor 1 before 5, 0.1 from 5, 0.01 from 10; a step past MAX_ITER is dropped.

    With a linear warm-up of 4 iterations from 0.5, iteration 2 (half-way) gets 0.5 * 0.5 + 0.5 * 1.
    """
    cfg = _cfg("SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.STEPS", "(5, 10, 30)",
               "SOLVER.GAMMA", "0.1", "SOLVER.WARMUP_ITERS", "0")  # fmt: skip
    schedule = build_lr_schedule(cfg)
    assert [schedule.multiplier(i) for i in (0, 4, 5, 9, 10, 19)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    cfg = _cfg("SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.STEPS", "(5, 10)",
               "SOLVER.WARMUP_ITERS", "4", "SOLVER.WARMUP_FACTOR", "0.5")  # fmt: skip
    schedule = build_lr_schedule(cfg)
    assert [schedule.multiplier(i) for i in (0, 2, 4)] == pytest.approx([0.5, 0.75, 1.0])


def test_warmup_poly() -> None:
    """DeepLab's WarmupPolyLR: (1 - i/10) ** 0.9 times a multiplicative warm-up; floor after warm-up.

    i=5: 0.5 ** 0.9 = 0.535886731; with POLY_LR_CONSTANT_ENDING 0.6 the floor applies: 0.6.
    Linear warm-up over 2 from 0.1, i=1: (0.1 * 0.5 + 0.5) * 0.9 ** 0.9 = 0.55 * 0.909532576 (no floor
    during warm-up).
    """
    opts = (
        "SOLVER.LR_SCHEDULER_NAME",
        "WarmupPolyLR",
        "SOLVER.MAX_ITER",
        "10",
        "SOLVER.POLY_LR_POWER",
        "0.9",
    )
    cfg = _cfg(*opts, "SOLVER.WARMUP_ITERS", "0")
    assert build_lr_schedule(cfg).multiplier(5) == pytest.approx(0.535886731)
    cfg = _cfg(*opts, "SOLVER.WARMUP_ITERS", "0", "SOLVER.POLY_LR_CONSTANT_ENDING", "0.6")
    assert build_lr_schedule(cfg).multiplier(5) == pytest.approx(0.6)
    cfg = _cfg(
        *opts,
        "SOLVER.WARMUP_ITERS",
        "2",
        "SOLVER.WARMUP_FACTOR",
        "0.1",
        "SOLVER.POLY_LR_CONSTANT_ENDING",
        "0.6",
    )
    assert build_lr_schedule(cfg).multiplier(1) == pytest.approx(0.5002429168)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (
            ("SOLVER.LR_SCHEDULER_NAME", "WarmupFooLR"),
            "SOLVER.LR_SCHEDULER_NAME 'WarmupFooLR' is not supported",
        ),
        (("SOLVER.WARMUP_METHOD", "exp"), "SOLVER.WARMUP_METHOD"),
        (("SOLVER.BASE_LR_END", "0.01"), "BASE_LR_END"),
        (("SOLVER.MAX_ITER", "0"), "SOLVER.MAX_ITER"),
    ],
)
def test_bad_schedule_settings_name_the_key(opts: tuple[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_lr_schedule(_cfg(*opts))


def test_scheduler_scales_every_group_and_restores_its_state() -> None:
    cfg = _cfg()
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-5}])
    scheduler = build_lr_scheduler(cfg, optimizer)
    assert scheduler.get_last_lr() == pytest.approx([1e-5, 1e-7])
    for _ in range(10):
        scheduler.step()
    assert scheduler.iteration == 10 and scheduler.get_last_lr() == pytest.approx([5e-4, 5e-6])
    state = scheduler.state_dict()

    fresh = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-5}])
    restored = LRScheduler(fresh, build_lr_schedule(cfg))
    restored.load_state_dict(state)
    assert restored.iteration == 10 and restored.get_last_lr() == pytest.approx([5e-4, 5e-6])
