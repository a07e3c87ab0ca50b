"""Optimizer with CAT-Seg's parameter-group rules, and detectron2-style gradient clipping.

The rules of CAT-Seg's ``Trainer.build_optimizer`` (as in the original SemLA code), applied to every parameter
with ``requires_grad`` (each tensor once, even when shared):

- learning rate ``BASE_LR``, times ``BACKBONE_MULTIPLIER`` if the owning module's name contains
  ``backbone``, times ``CLIP_MULTIPLIER`` if it contains ``clip_model`` (so every CLIP LoRA factor);
- weight decay ``WEIGHT_DECAY``; 0 for ``relative_position_bias_table`` / ``absolute_pos_embed``;
  ``WEIGHT_DECAY_NORM`` for parameters of normalisation layers; ``WEIGHT_DECAY_EMBED`` for
  ``nn.Embedding``.

The original makes one group per tensor; here tensors with the same (lr, weight decay) share a group,
which gives the same updates (AdamW and SGD treat the parameters of a group independently).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "NORM_MODULE_TYPES",
    "GradientClipper",
    "ParamGroupSummary",
    "build_gradient_clipper",
    "build_optimizer",
    "build_param_groups",
]

#: Module types whose parameters get ``WEIGHT_DECAY_NORM`` (detectron2's list).
NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)

_NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


@dataclass(frozen=True)
class ParamGroupSummary:
    """One optimizer parameter group: its hyper-parameters and what it holds."""

    lr: float
    weight_decay: float
    num_tensors: int
    numel: int
    names: tuple[str, ...]

    def __str__(self) -> str:
        example = self.names[0] if self.names else "-"
        return (
            f"lr={self.lr:.3g} weight_decay={self.weight_decay:.3g}: {self.num_tensors} tensors, "
            f"{self.numel:,} values (e.g. {example})"
        )


def build_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
    backbone_multiplier: float = 1.0,
    clip_multiplier: float = 1.0,
) -> tuple[list[dict[str, Any]], list[ParamGroupSummary]]:
    """Apply CAT-Seg's rules to the trainable parameters of ``model`` (pure; no optimizer built).

    Args:
        model: any module (a ``CATSeg``, or a PEFT model wrapping one).
        base_lr, weight_decay, weight_decay_norm, weight_decay_embed: ``SOLVER.*`` values.
        backbone_multiplier, clip_multiplier: ``SOLVER.BACKBONE_MULTIPLIER`` / ``CLIP_MULTIPLIER``.
    Returns:
        torch parameter groups (``{"params", "lr", "weight_decay"}``) in first-seen order, and a summary
        of each group with the parameter names.
    """
    groups: dict[tuple[float, float], list[tuple[str, nn.Parameter]]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr = base_lr
            if "backbone" in module_name:
                lr *= backbone_multiplier
            if "clip_model" in module_name:
                lr *= clip_multiplier
            decay = weight_decay
            if any(key in param_name for key in _NO_DECAY_NAMES):
                decay = 0.0
            if isinstance(module, NORM_MODULE_TYPES):
                decay = weight_decay_norm
            if isinstance(module, nn.Embedding):
                decay = weight_decay_embed
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            groups.setdefault((lr, decay), []).append((full_name, param))
    torch_groups = []
    summaries = []
    for (lr, decay), members in groups.items():
        torch_groups.append({"params": [p for _, p in members], "lr": lr, "weight_decay": decay})
        summaries.append(
            ParamGroupSummary(
                lr=lr,
                weight_decay=decay,
                num_tensors=len(members),
                numel=sum(p.numel() for _, p in members),
                names=tuple(name for name, _ in members),
            )
        )
    return torch_groups, summaries


def build_optimizer(cfg: Any, model: nn.Module) -> tuple[torch.optim.Optimizer, list[ParamGroupSummary]]:
    """The optimizer of ``SOLVER.OPTIMIZER`` over the trainable parameters of ``model``.

    ``ADAMW``: ``torch.optim.AdamW`` with torch's default betas and eps; ``SGD``: momentum
    ``SOLVER.MOMENTUM``. Gradient clipping is separate (:func:`build_gradient_clipper`).

    Args:
        cfg: a resolved config.
        model: the model to train (before any DistributedDataParallel wrapping).
    Returns:
        the optimizer and a summary of its parameter groups (also logged).
    Raises:
        ValueError: unknown optimizer, or no trainable parameter.
    """
    solver = cfg.SOLVER
    groups, summary = build_param_groups(
        model,
        base_lr=float(solver.BASE_LR),
        weight_decay=float(solver.WEIGHT_DECAY),
        weight_decay_norm=float(solver.WEIGHT_DECAY_NORM),
        weight_decay_embed=float(solver.WEIGHT_DECAY_EMBED),
        backbone_multiplier=float(solver.BACKBONE_MULTIPLIER),
        clip_multiplier=float(solver.CLIP_MULTIPLIER),
    )
    if not groups:
        raise ValueError("the model has no trainable parameter (every requires_grad is False)")
    name = solver.OPTIMIZER
    if name == "ADAMW":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=float(solver.BASE_LR))
    elif name == "SGD":
        optimizer = torch.optim.SGD(groups, lr=float(solver.BASE_LR), momentum=float(solver.MOMENTUM))
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got {name!r}")
    logger.info(
        "%s over %d tensors (%s values) in %d parameter groups:",
        name,
        sum(s.num_tensors for s in summary),
        f"{sum(s.numel for s in summary):,}",
        len(summary),
    )
    for item in summary:
        logger.info("  %s", item)
    return optimizer, summary


ClipType = Literal["full_model", "value", "norm"]


@dataclass(frozen=True)
class GradientClipper:
    """Gradient clipping of ``SOLVER.CLIP_GRADIENTS``.

    - ``full_model``: one ``clip_grad_norm_`` over all parameters, max norm ``clip_value`` (CAT-Seg's
      ``maybe_add_full_model_gradient_clipping``; the original configs use 0.01);
    - ``value`` / ``norm``: detectron2's per-parameter ``clip_grad_value_`` / ``clip_grad_norm_``.
    """

    clip_type: ClipType
    clip_value: float
    norm_type: float = 2.0

    def __call__(self, params: Iterable[torch.Tensor]) -> float | None:
        """Clip the gradients of ``params`` in place (unscale AMP gradients first).

        Returns:
            the total gradient norm before clipping for ``full_model``, else None.
        """
        params = [p for p in params if p.grad is not None]
        if not params:
            return None
        if self.clip_type == "full_model":
            return float(torch.nn.utils.clip_grad_norm_(params, self.clip_value, self.norm_type))
        for p in params:
            if self.clip_type == "value":
                torch.nn.utils.clip_grad_value_(p, self.clip_value)
            else:
                torch.nn.utils.clip_grad_norm_(p, self.clip_value, self.norm_type)
        return None


def build_gradient_clipper(cfg: Any) -> GradientClipper | None:
    """The clipper of ``SOLVER.CLIP_GRADIENTS``, or None when disabled.

    As in CAT-Seg, ``full_model`` with ``CLIP_VALUE <= 0`` means no clipping.

    Raises:
        ValueError: unknown ``CLIP_TYPE``.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    if clip.CLIP_TYPE not in ("full_model", "value", "norm"):
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be 'full_model', 'value' or 'norm', got {clip.CLIP_TYPE!r}"
        )
    if clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE <= 0:
        return None
    return GradientClipper(clip.CLIP_TYPE, float(clip.CLIP_VALUE), float(clip.NORM_TYPE))
