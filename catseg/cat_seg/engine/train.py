"""The iteration-based training loop (detectron2's ``SimpleTrainer``/``AMPTrainer`` and its hooks, in one class).

One iteration: next batch -> forward (autocast on CUDA with AMP) -> loss -> backward (scaled with AMP)
-> gradient clipping (on unscaled gradients) -> optimizer step -> LR scheduler step. Around it:
metrics every ``log_period`` iterations (JSON lines), periodic and final checkpoints, periodic
evaluation, and a tqdm progress bar. Iterations are 0-based as in detectron2: the checkpoint written
after iteration ``i`` is ``model_{i:07d}.pth`` and a resumed run starts at ``i + 1``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .checkpoint import checkpoint_file_name, save_training_checkpoint
from .io import append_jsonl
from .launch import is_main_process, reduce_mean
from .optim import GradientClipper
from .schedule import LRScheduler

logger = logging.getLogger(__name__)

__all__ = ["MetricsLog", "Trainer"]


class MetricsLog:
    """Appends JSON records to ``metrics.jsonl`` (nothing when ``path`` is None, e.g. on ranks > 0)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``{"timestamp": unix seconds, **record}``."""
        if self.path is not None:
            append_jsonl(self.path, {"timestamp": round(time.time(), 3), **record})


class Trainer:
    """Train ``model`` from ``start_iter`` to ``max_iter``.

    Args:
        model: the module called as ``model(batch) -> {"loss_...": loss}`` (possibly DDP-wrapped).
        optimizer: its optimizer.
        scheduler: the LR scheduler (stepped once per iteration).
        data_loader: an endless iterable of batches (lists of mapper dicts).
        max_iter: iterations of the whole run (``SOLVER.MAX_ITER``).
        start_iter: first iteration (0, or the resumed checkpoint's iteration + 1).
        device: the training device (autocast is used on CUDA only).
        clipper: gradient clipping, or None.
        grad_scaler: AMP ``GradScaler`` (CUDA + ``SOLVER.AMP.ENABLED``), or None for fp32.
        output_dir: where checkpoints go (rank 0 writes them).
        checkpoint_period: a checkpoint after every ``checkpoint_period`` iterations (<= 0: final only).
        checkpoint_state: returns the run-specific part of a checkpoint (``model``, ``lora``, ``seed``).
        draws_per_iter: training samples drawn per iteration by all processes (``IMS_PER_BATCH``).
        start_draw: sampler position at ``start_iter``.
        eval_period: evaluate every ``eval_period`` iterations (<= 0: never during training).
        evaluate: called as ``evaluate(iteration)`` on every rank.
        metrics: where rank 0 logs iteration metrics.
        log_period: iterations between log lines / metric records (the first and last are always logged).
        progress: show a tqdm bar (rank 0, interactive terminals).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler,
        data_loader: Iterable[list[dict[str, Any]]],
        max_iter: int,
        start_iter: int = 0,
        device: torch.device,
        clipper: GradientClipper | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        output_dir: str | Path,
        checkpoint_period: int = 0,
        checkpoint_state: Callable[[], dict[str, Any]],
        draws_per_iter: int,
        start_draw: int = 0,
        eval_period: int = 0,
        evaluate: Callable[[int], Any] | None = None,
        metrics: MetricsLog | None = None,
        log_period: int = 20,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data_loader = data_loader
        self.max_iter = int(max_iter)
        self.start_iter = int(start_iter)
        self.iter = self.start_iter
        self.device = device
        self.clipper = clipper
        self.grad_scaler = grad_scaler
        self.output_dir = Path(output_dir)
        self.checkpoint_period = int(checkpoint_period)
        self.checkpoint_state = checkpoint_state
        self.draws_per_iter = int(draws_per_iter)
        self.start_draw = int(start_draw)
        self.eval_period = int(eval_period)
        self.evaluate = evaluate
        self.metrics = metrics or MetricsLog(None)
        self.log_period = max(1, int(log_period))
        self.progress = progress
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # detectron2 reports the lr of the group with the most values.
        sizes = [sum(p.numel() for p in group["params"]) for group in optimizer.param_groups]
        self._lr_group = max(range(len(sizes)), key=sizes.__getitem__)

    # -- one step ----------------------------------------------------------------------------------
    def run_step(self, batch: list[dict[str, Any]]) -> dict[str, float]:
        """Forward, backward, clip, optimizer and scheduler step on one batch.

        Returns:
            the losses (``total_loss`` and each ``loss_*``), ``lr`` used, and ``grad_norm`` when clipping
            the full model.
        Raises:
            FloatingPointError: the loss is NaN or infinite (as detectron2).
        """
        amp = self.grad_scaler is not None
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=amp):
            loss_dict = self.model(batch)
        losses = sum(loss_dict.values())
        if not torch.isfinite(losses).all():
            raise FloatingPointError(
                f"loss became infinite or NaN at iteration {self.iter}: "
                + ", ".join(f"{k}={float(v):.4g}" for k, v in loss_dict.items())
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        grad_norm = None
        if self.clipper is not None:
            if self.grad_scaler is not None:
                self.grad_scaler.unscale_(self.optimizer)
            grad_norm = self.clipper(self.params)
        lr = float(self.optimizer.param_groups[self._lr_group]["lr"])
        self._updating = True  # parameters and optimizer state change together from here
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self._updating = False
        stats = {"total_loss": float(losses.detach()), "lr": lr}
        stats.update({k: float(v.detach()) for k, v in loss_dict.items()})
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm
        return stats

    # -- checkpoints -----------------------------------------------------------------------------------
    def checkpoint_payload(self, iteration: int) -> dict[str, Any]:
        """The checkpoint after ``iteration`` (see :mod:`cat_seg.engine.checkpoint`)."""
        return {
            **self.checkpoint_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "iteration": iteration,
            "next_draw": self.start_draw + (iteration + 1 - self.start_iter) * self.draws_per_iter,
            "torch_rng": torch.get_rng_state(),
        }

    def save_checkpoint(self, iteration: int, file_name: str) -> None:
        """Rank 0 writes the checkpoint after ``iteration`` (atomic) and updates ``last_checkpoint``."""
        if is_main_process():
            save_training_checkpoint(self.output_dir, file_name, self.checkpoint_payload(iteration))

    # -- the loop -------------------------------------------------------------------------------------
    def train(self) -> None:
        """Run the remaining iterations (nothing when ``start_iter >= max_iter``).

        If the loop stops on an error (a corrupt data file, Ctrl-C, ...), the last finished iteration is
        checkpointed first (unless it already is), so ``--resume`` loses no work.
        """
        if self.start_iter >= self.max_iter:
            logger.info(
                "iteration %d of %d already reached: nothing to train", self.start_iter, self.max_iter
            )
            return
        logger.info("training from iteration %d to %d", self.start_iter, self.max_iter)
        self.metrics.write({"event": "train_start", "start_iter": self.start_iter, "max_iter": self.max_iter})
        show = self.progress and is_main_process()
        bar = tqdm(
            total=self.max_iter, initial=self.start_iter, disable=not show, dynamic_ncols=True, unit="it"
        )
        redirect = logging_redirect_tqdm() if show else contextlib.nullcontext()
        started = time.perf_counter()
        data: Iterator[list[dict[str, Any]]] = iter(self.data_loader)
        self._completed = self._saved = self.start_iter - 1  # last iteration finished / checkpointed
        self._updating = False
        # Without a progress bar (no terminal), a log line at least every 30 s as well.
        self._log_every_s = None if show else 30.0
        self._last_log = time.perf_counter()
        try:
            with bar, redirect:
                for iteration in range(self.start_iter, self.max_iter):
                    self._iteration(iteration, data, bar, started)
        except BaseException:
            self._save_on_error()
            raise

    def _iteration(
        self, iteration: int, data: Iterator[list[dict[str, Any]]], bar: Any, started: float
    ) -> None:
        self.iter = iteration
        t0 = time.perf_counter()
        batch = next(data)
        data_time = time.perf_counter() - t0
        stats = self.run_step(batch)
        self._completed = iteration
        step_time = time.perf_counter() - t0
        bar.set_postfix(loss=f"{stats['total_loss']:.4f}", lr=f"{stats['lr']:.2e}", refresh=False)
        bar.update(1)
        done = iteration + 1
        if iteration == self.start_iter or done % self.log_period == 0 or done == self.max_iter:
            self._log(iteration, stats, step_time, data_time, started)
        elif self._log_every_s is not None and time.perf_counter() - self._last_log >= self._log_every_s:
            self._progress_line(iteration, stats, started)
        if self.checkpoint_period > 0 and done % self.checkpoint_period == 0:
            self.save_checkpoint(iteration, checkpoint_file_name(iteration))
            self._saved = iteration
        if done == self.max_iter:
            self.save_checkpoint(iteration, "model_final.pth")
            self._saved = iteration
        elif self.evaluate is not None and self.eval_period > 0 and done % self.eval_period == 0:
            self.evaluate(iteration)

    def _save_on_error(self) -> None:
        """Checkpoint the last finished iteration after an error, unless it is saved already or the error
        hit a parameter update (then the state is not that of a finished iteration)."""
        completed = self._completed
        if completed <= self._saved or self._updating:
            return
        try:
            self.save_checkpoint(completed, checkpoint_file_name(completed))
        except Exception:  # noqa: BLE001 - the original error matters more; say that this failed too
            logger.exception("could not save a checkpoint after the error")
            return
        logger.warning(
            "stopped by an error after iteration %d; saved %s (--resume continues from there)",
            completed + 1,
            checkpoint_file_name(completed),
        )

    def _progress_line(self, iteration: int, stats: dict[str, float], started: float) -> None:
        """A log line between the regular ones (no terminal, slow iterations): this process's loss, no
        collective call (each process decides from its own clock) and no metrics record."""
        self._last_log = time.perf_counter()
        if not is_main_process():
            return
        seconds_per_iter = (time.perf_counter() - started) / (iteration + 1 - self.start_iter)
        eta = seconds_per_iter * (self.max_iter - iteration - 1)
        logger.info(
            "iter %d/%d  loss %.4f (this process)  lr %.3g  %.3f s/it  eta %s",
            iteration + 1,
            self.max_iter,
            stats["total_loss"],
            stats["lr"],
            seconds_per_iter,
            time.strftime("%H:%M:%S", time.gmtime(eta)),
        )

    def _log(
        self, iteration: int, stats: dict[str, float], step_time: float, data_time: float, started: float
    ) -> None:
        """Log one line and one metrics record (losses averaged over processes: a collective call)."""
        self._last_log = time.perf_counter()
        losses = {k: reduce_mean(v, self.device) for k, v in stats.items() if "loss" in k}
        done = iteration + 1 - self.start_iter
        seconds_per_iter = (time.perf_counter() - started) / done
        eta = seconds_per_iter * (self.max_iter - iteration - 1)
        record = {
            "iteration": iteration,
            **losses,
            "lr": stats["lr"],
            "sec_per_iter": step_time,
            "data_time": data_time,
        }
        if "grad_norm" in stats:
            record["grad_norm"] = stats["grad_norm"]
        if self.device.type == "cuda":
            record["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.metrics.write(record)
        logger.info(
            "iter %d/%d  loss %.4f  lr %.3g  %.3f s/it  eta %s",
            iteration + 1,
            self.max_iter,
            losses["total_loss"],
            stats["lr"],
            seconds_per_iter,
            time.strftime("%H:%M:%S", time.gmtime(eta)),
        )
