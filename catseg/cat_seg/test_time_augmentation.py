"""Test-time augmentation (TTA): multi-scale + horizontal flip, the model's class scores averaged over views.

What detectron2's ``DatasetMapperTTA`` + MaskFormer/CAT-Seg's ``SemanticSegmentorWithTTA`` (the original's
``cat_seg/test_time_augmentation.py``, used when ``TEST.AUG.ENABLED``) compute, as one function that any
caller wraps around its own "predict one batch" callable::

    tta = TTASettings.from_cfg(cfg)                                   # None unless TEST.AUG.ENABLED
    outputs = predict_with_tta(lambda views: model(views, text_features=text), batch, tta)

For every input, the views are, in this order, for each size ``s`` of ``TEST.AUG.MIN_SIZES``: the image
resized so that its short side is ``s`` (long side capped at ``TEST.AUG.MAX_SIZE``: detectron2's
``ResizeShortestEdge``, PIL bilinear on uint8 images), then, with ``TEST.AUG.FLIP``, that image mirrored
left-right. Each view keeps the input's ``height``/``width``, so the model returns its scores at the
output size; a mirrored view's scores are mirrored back; the views' scores are summed in view order and
divided by the number of views.

What is averaged: the model's ``sem_seg`` output as it is, which is what ``SemanticSegmentorWithTTA``
averages. For CAT-Seg these are per-class **sigmoid probabilities** (each in [0, 1]; they do not sum to 1
over the classes, there is no softmax), so the average is again in [0, 1] and its argmax is the prediction.

The callable is the caller's ordinary inference path, called once per view with the whole batch (one view
of every image), so everything it does applies to every view: the sliding window, fused SemLA adapters
(``domain_orchestrator.step.segment`` enters them once around all views), and text features computed once
by the caller. Cost: ``len(MIN_SIZES) x (2 if FLIP else 1)`` forward passes per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data.transforms import resize_image, shortest_edge_size

logger = logging.getLogger(__name__)

__all__ = ["TTASettings", "augment_input", "predict_with_tta"]

Predict = Callable[[list[dict[str, Any]]], Sequence[Mapping[str, Tensor]]]


@dataclass(frozen=True)
class TTASettings:
    """The views of test-time augmentation (``TEST.AUG.*``).

    Attributes:
        min_sizes: ``TEST.AUG.MIN_SIZES``, the short side of each scale, each > 0 (at least one).
        max_size: ``TEST.AUG.MAX_SIZE``, > 0: the cap on the long side. As in detectron2 it wins over a min
            size, so a size larger than ``max_size`` gives a view whose short side is smaller than that size.
        flip: ``TEST.AUG.FLIP``, add the left-right mirror of every scale.
    """

    min_sizes: tuple[int, ...]
    max_size: int
    flip: bool = True

    def __post_init__(self) -> None:
        sizes = self.min_sizes
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
            raise ValueError(f"TEST.AUG.MIN_SIZES must hold at least one size, got {sizes!r}")
        bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s <= 0]
        if bad:
            raise ValueError(f"TEST.AUG.MIN_SIZES must hold integers > 0, got {bad[0]!r} in {tuple(sizes)!r}")
        if isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or self.max_size <= 0:
            raise ValueError(f"TEST.AUG.MAX_SIZE must be an integer > 0, got {self.max_size!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"TEST.AUG.FLIP must be True or False, got {self.flip!r}")
        object.__setattr__(self, "min_sizes", tuple(sizes))

    @classmethod
    def from_cfg(cls, cfg: Any) -> TTASettings | None:
        """The settings of ``cfg.TEST.AUG``, or None when ``TEST.AUG.ENABLED`` is False.

        Raises:
            ValueError: an invalid setting, naming its key.
        """
        aug = cfg.TEST.AUG
        if not aug.ENABLED:
            return None
        return cls(min_sizes=tuple(aug.MIN_SIZES), max_size=aug.MAX_SIZE, flip=aug.FLIP)

    @property
    def views(self) -> tuple[tuple[int, bool], ...]:
        """``(min_size, flipped)`` of every view, in detectron2's order (each size, then its mirror)."""
        flips = (False, True) if self.flip else (False,)
        return tuple((size, flip) for size in self.min_sizes for flip in flips)

    def describe(self) -> str:
        """One line for logs: the number of views and what they are."""
        sizes = ", ".join(str(s) for s in self.min_sizes)
        mirror = " and their flips" if self.flip else ""
        return f"{len(self.views)} views: short side {sizes} (long side <= {self.max_size}){mirror}"


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(3, H, W) -> (3, h, w) as detectron2's ``ResizeTransform``: PIL bilinear for uint8, else torch bilinear."""
    if image.dtype == torch.uint8:
        hwc = image.permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
        resized = resize_image(np.ascontiguousarray(hwc), size)  # (h, w, 3)
        return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).to(image.device)
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return out.to(image.dtype)


def augment_input(inputs: Mapping[str, Any], min_size: int, max_size: int, flip: bool) -> dict[str, Any]:
    """One view of one model input.

    Args:
        inputs: a model input dict: ``"image"`` (3, H, W) and optional ``"height"``/``"width"``.
        min_size: the view's short side (``ResizeShortestEdge``; no resize when the image already has the
            size this gives).
        max_size: the cap on the long side.
        flip: mirror the resized image left-right.
    Returns:
        a shallow copy of ``inputs`` with the view's image and ``height``/``width`` set to the input's
        output size (default: the image's own size, as detectron2's TTA sets them).
    """
    image = inputs["image"]
    height, width = int(image.shape[-2]), int(image.shape[-1])
    view = dict(inputs)
    view["height"] = int(inputs.get("height", height))
    view["width"] = int(inputs.get("width", width))
    size = shortest_edge_size(height, width, min_size, max_size)
    if size != (height, width):
        image = _resize(image, size)
    if flip:
        image = image.flip(-1)
    view["image"] = image
    return view


def predict_with_tta(
    predict: Predict, batch: Sequence[Mapping[str, Any]], tta: TTASettings | None
) -> list[dict[str, Tensor]]:
    """Predict ``batch`` from every view of ``tta`` and average the views' ``sem_seg`` scores.

    Args:
        predict: the caller's inference on a list of input dicts, returning one ``{"sem_seg": (T, H, W)}``
            per input at its ``height``/``width`` (a model's eval forward, with whatever text features and
            fused adapters the caller set up).
        batch: the inputs (one dict per image).
        tta: the views; None calls ``predict(batch)`` once and returns its outputs unchanged.
    Returns:
        one ``{"sem_seg": (T, height, width)}`` per input: the mean over the views of the model's scores
        (mirrored views mirrored back).
    """
    if tta is None:
        return list(predict(list(batch)))
    sums: list[Tensor] = []
    for index, (min_size, flip) in enumerate(tta.views):
        views = [augment_input(x, min_size, tta.max_size, flip) for x in batch]
        outputs = predict(views)
        if len(outputs) != len(batch):
            raise RuntimeError(f"the prediction returned {len(outputs)} outputs for {len(batch)} inputs")
        for i, output in enumerate(outputs):
            scores = output["sem_seg"]
            if flip:
                scores = scores.flip(-1)
            if index == 0:
                sums.append(scores.clone() if not flip else scores)
            elif scores.shape != sums[i].shape:
                raise RuntimeError(
                    f"view {index} (short side {min_size}{', flipped' if flip else ''}) gave scores of "
                    f"shape {tuple(scores.shape)} for input {i}, the first view {tuple(sums[i].shape)}"
                )
            else:
                sums[i] += scores
    count = len(tta.views)
    return [{"sem_seg": total / count} for total in sums]
