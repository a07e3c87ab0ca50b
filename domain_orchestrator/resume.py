"""The resume state of an experiment run: where each process stands inside the target it is evaluating.

Saved to ``<output_dir>/progress/<target>.rank<r>.pt`` every ``--save_every`` seconds and when the run is
interrupted; ``--resume`` continues from it (the same batches are formed, so the final numbers equal an
uninterrupted run's). The folder keeps the name ``progress`` of earlier versions so that their
interrupted runs still resume. A target's files are deleted once its outputs are written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cat_seg.evaluation import SemSegEvaluator
from cat_seg.fileio import atomic_write

from .settings import ExperimentError

logger = logging.getLogger(__name__)

__all__ = ["RESUME_DIR", "ResumeState", "load_resume_state", "resume_file", "save_resume_state"]

RESUME_DIR = "progress"
_FORMAT = 1


@dataclass
class ResumeState:
    """Where one process stands inside one target.

    Attributes:
        position: images of this process's shard done.
        confusion: per experiment, the confusion matrix so far.
        num_images: per experiment, the images scored so far.
        embeddings: (n, D) embeddings of the shard's images, once computed (semla).
    """

    position: int = 0
    confusion: dict[str, torch.Tensor] = field(default_factory=dict)
    num_images: dict[str, int] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None

    def record(self, evaluators: Mapping[str, SemSegEvaluator]) -> None:
        """Copy the evaluators' confusion matrices and counts into the state (before saving it)."""
        self.confusion = {e: torch.from_numpy(ev.confusion_matrix) for e, ev in evaluators.items()}
        self.num_images = {e: ev.num_images for e, ev in evaluators.items()}


def resume_file(output_dir: Path, target: str, rank: int) -> Path:
    """``<output_dir>/progress/<target>.rank<rank>.pt``."""
    return Path(output_dir) / RESUME_DIR / f"{target}.rank{rank}.pt"


def save_resume_state(path: Path, state: ResumeState, run: Mapping[str, Any]) -> None:
    """Write ``state`` atomically with ``run`` (target, rank, world size, batch size, shard size)."""
    payload = {
        "format": _FORMAT,
        **run,
        "position": state.position,
        "confusion": state.confusion,
        "num_images": state.num_images,
        "embeddings": state.embeddings,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def load_resume_state(path: Path, run: Mapping[str, Any]) -> ResumeState:
    """Read a state saved for the same ``run`` (target, rank, world size, batch size, shard size).

    Raises:
        ExperimentError: the file cannot be read or belongs to another run (naming it; deleting it redoes
            the target).
    """
    target = run["target"]
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: say which and stop
        raise ExperimentError(
            [f"{path}: resume state cannot be read ({e}); delete it to redo {target}"]
        ) from None
    wrong = {k: payload.get(k) for k, v in run.items() if payload.get(k) != v}
    if payload.get("format") != _FORMAT or wrong:
        raise ExperimentError([f"{path}: resume state of another run ({wrong}); delete it to redo {target}"])
    logger.info("%s: resuming at image %d of %d of this process", target, payload["position"], run["shard"])
    return ResumeState(
        position=int(payload["position"]),
        confusion=dict(payload["confusion"]),
        num_images={k: int(v) for k, v in payload["num_images"].items()},
        embeddings=payload["embeddings"],
    )
