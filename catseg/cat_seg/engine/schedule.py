"""Learning-rate schedules with detectron2's semantics, as pure functions of the iteration.

A schedule gives a *multiplier* of each parameter group's initial learning rate at an iteration
(0-based: iteration ``i`` is the ``i``-th optimizer step). Supported ``SOLVER.LR_SCHEDULER_NAME`` values:

- ``WarmupCosineLR`` and ``WarmupMultiStepLR``: detectron2's ``build_lr_scheduler`` (detectron2 >= 0.6,
  what the original runs), i.e. ``LRMultiplier(WarmupParamScheduler(main, ...))`` evaluated at
  ``where = i / MAX_ITER``. The main schedule is a cosine from 1 to ``BASE_LR_END / BASE_LR`` or a step
  function ``GAMMA ** k`` at ``STEPS``. The warm-up covers ``where < WARMUP_ITERS / MAX_ITER``; there,
  ``linear`` *interpolates* from ``WARMUP_FACTOR * main(0)`` to ``main(WARMUP_ITERS / MAX_ITER)`` (the
  value the main schedule has when warm-up ends), and ``constant`` holds ``WARMUP_FACTOR * main(0)``.
  (detectron2's older ``WarmupCosineLR`` class multiplied the cosine by the warm-up factor instead; the
  two agree outside the warm-up.)
- ``WarmupPolyLR``: the DeepLab project's scheduler (``detectron2.projects.deeplab``, which CAT-Seg's
  ``build_lr_scheduler`` dispatches to first): ``warmup(i) * (1 - i / MAX_ITER) ** POLY_LR_POWER`` with a
  multiplicative warm-up, and a floor ``POLY_LR_CONSTANT_ENDING`` once warm-up is over (when > 0).

:class:`LRScheduler` applies a schedule to an optimizer and keeps the iteration for checkpoints.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "LR_SCHEDULER_NAMES",
    "LRSchedule",
    "LRScheduler",
    "WarmupCosineSchedule",
    "WarmupMultiStepSchedule",
    "WarmupPolySchedule",
    "build_lr_schedule",
    "build_lr_scheduler",
    "lr_at",
]

#: Values of ``SOLVER.LR_SCHEDULER_NAME`` this module implements.
LR_SCHEDULER_NAMES = ("WarmupCosineLR", "WarmupMultiStepLR", "WarmupPolyLR")

WarmupMethod = Literal["linear", "constant"]

# fvcore's ParamScheduler.WHERE_EPSILON: guards float rounding of iteration / max_iter at boundaries.
_WHERE_EPSILON = 1e-6


class LRSchedule(Protocol):
    """A learning-rate multiplier as a function of the (0-based) iteration."""

    max_iter: int

    def multiplier(self, iteration: int) -> float:
        """Factor applied to every parameter group's initial learning rate at ``iteration``."""
        ...


def _check_warmup(method: str, factor: float, iters: int) -> None:
    if method not in ("linear", "constant"):
        raise ValueError(f"SOLVER.WARMUP_METHOD must be 'linear' or 'constant', got {method!r}")
    if factor < 0:
        raise ValueError(f"SOLVER.WARMUP_FACTOR must be >= 0, got {factor}")
    if iters < 0:
        raise ValueError(f"SOLVER.WARMUP_ITERS must be >= 0, got {iters}")


@dataclass(frozen=True)
class _ParamWarmup:
    """detectron2's ``WarmupParamScheduler`` around a main schedule ``main(where)``, ``where`` in [0, 1]."""

    max_iter: int
    warmup_factor: float
    warmup_iters: int
    warmup_method: WarmupMethod
    rescale_interval: bool = False

    def __post_init__(self) -> None:
        if self.max_iter <= 0:
            raise ValueError(f"SOLVER.MAX_ITER must be > 0, got {self.max_iter}")
        _check_warmup(self.warmup_method, self.warmup_factor, self.warmup_iters)

    def main(self, where: float) -> float:
        raise NotImplementedError

    def multiplier(self, iteration: int) -> float:
        where = iteration / self.max_iter
        length = min(self.warmup_iters / self.max_iter, 1.0)
        if where + _WHERE_EPSILON <= length:  # inside the warm-up segment
            start = self.warmup_factor * self.main(0.0)
            if self.warmup_method == "constant":
                return start
            end = self.main(0.0) if self.rescale_interval else self.main(length)
            t = where / length
            return end * t + start * (1.0 - t)
        if self.rescale_interval:
            return self.main((where - length) / (1.0 - length))
        return self.main(where)


@dataclass(frozen=True)
class WarmupCosineSchedule(_ParamWarmup):
    """Cosine from 1 to ``end_value`` over ``max_iter`` with detectron2's warm-up.

    Example (``MAX_ITER 20``, ``WARMUP_ITERS 2``, ``WARMUP_FACTOR 0.01``, linear, ``end_value 0``):
    ``multiplier(0) = 0.01``; ``multiplier(1) = 0.5 * 0.01 + 0.5 * c(0.1)``; ``multiplier(i) = c(i / 20)``
    for ``i >= 2``, with ``c(w) = 0.5 * (1 + cos(pi * w))``.
    """

    end_value: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.end_value <= 1.0:
            raise ValueError(f"SOLVER.BASE_LR_END / SOLVER.BASE_LR must be in [0, 1], got {self.end_value}")

    def main(self, where: float) -> float:
        return self.end_value + 0.5 * (1.0 - self.end_value) * (1.0 + math.cos(math.pi * where))


@dataclass(frozen=True)
class WarmupMultiStepSchedule(_ParamWarmup):
    """``gamma ** k`` after the k-th of ``steps`` (iterations), with detectron2's warm-up."""

    steps: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if list(self.steps) != sorted(self.steps) or len(set(self.steps)) != len(self.steps):
            raise ValueError(f"SOLVER.STEPS must be strictly increasing, got {list(self.steps)}")

    def main(self, where: float) -> float:
        iteration = int((where + _WHERE_EPSILON) * self.max_iter)
        return self.gamma ** bisect.bisect_right(self.steps, iteration)


@dataclass(frozen=True)
class WarmupPolySchedule:
    """DeepLab's ``WarmupPolyLR``: ``warmup(i) * (1 - i / max_iter) ** power``, floored at ``constant_ending``.

    ``warmup(i)`` is 1 from ``warmup_iters`` on; before, ``warmup_factor`` (constant) or
    ``warmup_factor * (1 - a) + a`` with ``a = i / warmup_iters`` (linear).
    """

    max_iter: int
    warmup_factor: float
    warmup_iters: int
    warmup_method: WarmupMethod
    power: float = 0.9
    constant_ending: float = 0.0

    def __post_init__(self) -> None:
        if self.max_iter <= 0:
            raise ValueError(f"SOLVER.MAX_ITER must be > 0, got {self.max_iter}")
        _check_warmup(self.warmup_method, self.warmup_factor, self.warmup_iters)

    def multiplier(self, iteration: int) -> float:
        if iteration >= self.warmup_iters:
            warmup = 1.0
        elif self.warmup_method == "constant":
            warmup = self.warmup_factor
        else:
            alpha = iteration / self.warmup_iters
            warmup = self.warmup_factor * (1.0 - alpha) + alpha
        poly = (1.0 - iteration / self.max_iter) ** self.power
        if self.constant_ending > 0 and warmup == 1.0 and poly < self.constant_ending:
            return self.constant_ending
        return warmup * poly


def build_lr_schedule(cfg: Any) -> LRSchedule:
    """The schedule a config asks for (``SOLVER.LR_SCHEDULER_NAME`` and its ``SOLVER.*`` keys).

    Args:
        cfg: a resolved config.
    Returns:
        a schedule with ``multiplier(iteration)``.
    Raises:
        ValueError: unknown scheduler name or invalid values, naming the key.
    """
    solver = cfg.SOLVER
    name = solver.LR_SCHEDULER_NAME
    warmup: dict[str, Any] = {
        "max_iter": int(solver.MAX_ITER),
        "warmup_factor": float(solver.WARMUP_FACTOR),
        "warmup_iters": int(solver.WARMUP_ITERS),
        "warmup_method": solver.WARMUP_METHOD,
    }
    if name == "WarmupCosineLR":
        if solver.BASE_LR <= 0:
            raise ValueError(f"SOLVER.BASE_LR must be > 0 for WarmupCosineLR, got {solver.BASE_LR}")
        return WarmupCosineSchedule(
            **warmup,
            rescale_interval=bool(solver.RESCALE_INTERVAL),
            end_value=float(solver.BASE_LR_END) / float(solver.BASE_LR),
        )
    if name == "WarmupMultiStepLR":
        steps = tuple(int(s) for s in solver.STEPS if s <= solver.MAX_ITER)
        if len(steps) != len(solver.STEPS):
            logger.warning(
                "SOLVER.STEPS %s has values beyond SOLVER.MAX_ITER; they are ignored", solver.STEPS
            )
        return WarmupMultiStepSchedule(
            **warmup, rescale_interval=bool(solver.RESCALE_INTERVAL), steps=steps, gamma=float(solver.GAMMA)
        )
    if name == "WarmupPolyLR":
        return WarmupPolySchedule(
            **warmup,
            power=float(solver.POLY_LR_POWER),
            constant_ending=float(solver.POLY_LR_CONSTANT_ENDING),
        )
    raise ValueError(
        f"SOLVER.LR_SCHEDULER_NAME {name!r} is not supported; choose one of {list(LR_SCHEDULER_NAMES)}"
    )


def lr_at(cfg: Any, iteration: int) -> float:
    """The learning rate of a group whose initial rate is ``SOLVER.BASE_LR``, at ``iteration`` (pure)."""
    return float(cfg.SOLVER.BASE_LR) * build_lr_schedule(cfg).multiplier(iteration)


class LRScheduler:
    """Sets each parameter group's ``lr`` to ``initial_lr * schedule.multiplier(iteration)``.

    ``iteration`` is the iteration the current rates are for; call :meth:`step` after each optimizer
    step. The initial rates are stored in the groups as ``initial_lr`` (as torch's schedulers do).

    Args:
        optimizer: the optimizer; its groups' current ``lr`` become their initial rates.
        schedule: see :func:`build_lr_schedule`.
        start_iter: first iteration (a resumed run loads :meth:`state_dict` instead).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, schedule: LRSchedule, *, start_iter: int = 0
    ) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.base_lrs = [
            float(group.setdefault("initial_lr", group["lr"])) for group in optimizer.param_groups
        ]
        self.iteration = int(start_iter)
        self._apply()

    def _apply(self) -> None:
        factor = self.schedule.multiplier(self.iteration)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        """Advance to the next iteration."""
        self.iteration += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """Current learning rate of each group."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """``{"iteration", "base_lrs"}`` (plain numbers; safe for ``torch.load(weights_only=True)``)."""
        return {"iteration": self.iteration, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the iteration and initial rates, and set the groups' rates accordingly."""
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(
                f"scheduler state has {len(state['base_lrs'])} parameter groups, "
                f"the optimizer {len(self.optimizer.param_groups)}"
            )
        self.iteration = int(state["iteration"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._apply()


def build_lr_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, *, start_iter: int = 0) -> LRScheduler:
    """:class:`LRScheduler` with :func:`build_lr_schedule` ``(cfg)``."""
    return LRScheduler(optimizer, build_lr_schedule(cfg), start_iter=start_iter)
