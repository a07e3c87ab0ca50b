"""Training checkpoints (detectron2 layout) that can be resumed exactly, and refuse the wrong run.

``OUTPUT_DIR`` holds ``model_0000009.pth`` ... (``model_{iteration:07d}.pth``, 0-based iteration of the
last step done), ``model_final.pth`` and a text file ``last_checkpoint`` naming the newest one, as
detectron2 writes them. Every file is written atomically. A checkpoint is a ``torch.save`` dict that
loads with ``weights_only=True``:

=================  ==============================================================================
``format``         :data:`CHECKPOINT_FORMAT`
``model``          full-model runs: the whole state dict (so ``MODEL.WEIGHTS`` can point at it);
                   LoRA runs: only the trainable (LoRA) tensors, by PEFT parameter name
``lora``           None for full-model runs; else the adapter's name, r, alpha and target modules
``optimizer``      optimizer state
``scheduler``      :class:`~cat_seg.engine.schedule.LRScheduler` state
``grad_scaler``    AMP ``GradScaler`` state, or None
``iteration``      last finished iteration (0-based); training resumes at ``iteration + 1``
``next_draw``      global position of the training sampler after that iteration
``seed``           seed of the sampler and augmentations
``torch_rng``      CPU RNG state of rank 0
=================  ==============================================================================

Unlike the original SemLA code, resuming a LoRA checkpoint into a full-model run (or the
reverse, or into another adapter) is an error, raised before anything is built.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .io import atomic_torch_save, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "LAST_CHECKPOINT",
    "ResumeError",
    "check_resume_compatible",
    "checkpoint_file_name",
    "describe_run_kind",
    "load_training_checkpoint",
    "read_last_checkpoint",
    "save_training_checkpoint",
]

CHECKPOINT_FORMAT = "semla-train-1"
LAST_CHECKPOINT = "last_checkpoint"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed by this run; the message names the file and the mismatch."""


def checkpoint_file_name(iteration: int) -> str:
    """detectron2's periodic checkpoint name: ``model_{iteration:07d}.pth``."""
    return f"model_{iteration:07d}.pth"


def read_last_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint named by ``<output_dir>/last_checkpoint``, or None when there is no such file.

    Raises:
        ResumeError: ``last_checkpoint`` names a file that does not exist.
    """
    marker = Path(output_dir) / LAST_CHECKPOINT
    if not marker.is_file():
        return None
    name = marker.read_text(encoding="utf-8").strip()
    path = Path(output_dir) / name
    if not name or not path.is_file():
        raise ResumeError(f"{marker} names {name!r}, but {path} does not exist")
    return path


def save_training_checkpoint(
    output_dir: str | os.PathLike[str], file_name: str, payload: dict[str, Any]
) -> Path:
    """Write ``payload`` to ``<output_dir>/<file_name>`` and point ``last_checkpoint`` at it (both atomic).

    Args:
        output_dir: the run's output folder.
        file_name: e.g. ``model_0000009.pth`` or ``model_final.pth``.
        payload: the checkpoint dict (see the module docstring); ``format`` is added.
    Returns:
        the checkpoint path.
    """
    path = Path(output_dir) / file_name
    atomic_torch_save({"format": CHECKPOINT_FORMAT, **payload}, path)
    atomic_write_text(Path(output_dir) / LAST_CHECKPOINT, file_name)
    logger.info("saved checkpoint %s", path)
    return path


def load_training_checkpoint(path: str | os.PathLike[str], *, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_training_checkpoint` (``weights_only=True``).

    Args:
        path: the checkpoint file.
        mmap: map tensors lazily (cheap inspection of ``lora``/``iteration`` in large files).
    Raises:
        ResumeError: unreadable, or not written by this trainer (e.g. a detectron2 checkpoint).
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise ResumeError(f"{path}: not a readable checkpoint ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(
            f"{path}: not a training checkpoint of this trainer (format {CHECKPOINT_FORMAT!r}); it cannot be "
            "resumed. Use another OUTPUT_DIR, or pass the file as MODEL.WEIGHTS to start from its weights"
        )
    return payload


def describe_run_kind(lora: dict[str, Any] | None) -> str:
    """Human-readable kind of run a ``lora`` signature stands for."""
    if lora is None:
        return "a full CAT-Seg fine-tuning run (MODEL.LORA.ENABLED False)"
    return f"a LoRA run of adapter {lora.get('name')!r} (MODEL.LORA.ENABLED True)"


def check_resume_compatible(
    payload: dict[str, Any], path: str | os.PathLike[str], lora: dict[str, Any] | None
) -> None:
    """Refuse to resume ``payload`` into a run of another kind.

    Args:
        payload: a loaded checkpoint.
        path: its file (for the message).
        lora: this run's LoRA signature (``name``, ``r``, ``lora_alpha``, ``target_modules``, ...) or
            None for a full-model run.
    Raises:
        ResumeError: LoRA vs full-model, or another adapter name / rank / alpha / target list.
    """
    saved = payload.get("lora")
    if (saved is None) != (lora is None):
        raise ResumeError(
            f"{path} is a checkpoint of {describe_run_kind(saved)}; it cannot be resumed into "
            f"{describe_run_kind(lora)}. Use another OUTPUT_DIR (or delete {Path(path).parent / LAST_CHECKPOINT} "
            "to start over)"
        )
    if saved is None or lora is None:
        return
    differing = sorted(k for k in set(saved) | set(lora) if saved.get(k) != lora.get(k))
    if differing:
        details = ", ".join(
            f"{k}: checkpoint {_short(saved.get(k))} vs run {_short(lora.get(k))}" for k in differing
        )
        raise ResumeError(
            f"{path} was written for another LoRA setting ({details}). Use another OUTPUT_DIR (or delete "
            f"{Path(path).parent / LAST_CHECKPOINT} to start over)"
        )


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 3:
        return f"[{len(value)} names, first {value[0]!r}]"
    return repr(value)
