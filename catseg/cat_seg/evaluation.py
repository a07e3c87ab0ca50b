"""Semantic-segmentation evaluation from a confusion matrix.

Two metric conventions are supported (as in the original SemLA code):

* ``"detectron2"`` -- detectron2's ``SemSegEvaluator``: per-class IoU and accuracy, with classes that have
  no ground-truth pixel left out of every mean (their per-class values are NaN). Keys: ``mIoU``,
  ``fwIoU``, ``mACC``, ``pACC``, ``IoU-<class>``, ``ACC-<class>``. Used by every SemLA domain except the
  Cityscapes family.
* ``"cityscapes"`` -- everything above plus cityscapesScripts' class average ``IoU``: the mean over the
  classes with ``tp + fp + fn > 0``, so a class that is absent from the ground truth but predicted counts
  with IoU 0. When a category table is known (by default for the 19 Cityscapes train ids) ``IoU_sup`` is
  the same average over categories. Used by ACDC, MUSES and Cityscapes.

cityscapesScripts evaluates ``labelIds`` after mapping train ids to ids. For the 19 evaluated classes that
mapping is a bijection, and ground-truth pixels of ``ignoreInEval`` ids are excluded from false positives,
exactly as pixels equal to ``ignore_label`` are skipped here; the results therefore coincide (a test
checks this against cityscapesScripts' own functions).

Confusion matrices in this module are ``(N, N)`` int64 with **rows = ground truth, columns = prediction**
(the transpose of detectron2's, which also carries an extra ignore bin; ignored pixels are skipped here).
All values returned by the evaluator are percentages in [0, 100], or NaN where a metric is undefined.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Convention",
    "SemSegEvaluator",
    "accuracy_from_confusion",
    "category_confusion",
    "cityscapes_iou_from_confusion",
    "cityscapes_metrics",
    "cityscapes_train_id_categories",
    "confusion_from_labels",
    "iou_from_confusion",
    "pred_from_scores",
    "semseg_metrics",
]

logger = logging.getLogger(__name__)

Convention = Literal["detectron2", "cityscapes"]
_CONVENTIONS: tuple[str, ...] = ("detectron2", "cityscapes")
_NUM_CITYSCAPES_CLASSES = 19
_MAX_BAD_VALUES_SHOWN = 8

ArrayLike = np.ndarray | Tensor


# --------------------------------------------------------------------------------------------------
# Label maps -> confusion matrix
# --------------------------------------------------------------------------------------------------


def pred_from_scores(scores: ArrayLike) -> ArrayLike:
    """Turn per-class scores into predicted class ids.

    Args:
        scores: (C, H, W) scores or logits, higher = more likely; numpy array or torch tensor.
    Returns:
        (H, W) int64 class ids (argmax over C), of the same array type and device as ``scores``.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be (C, H, W), got shape {tuple(scores.shape)}")
    if isinstance(scores, Tensor):
        return scores.argmax(dim=0)
    return np.asarray(scores).argmax(axis=0).astype(np.int64)


def _is_integer_dtype(x: ArrayLike) -> bool:
    if isinstance(x, Tensor):
        return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)
    return np.issubdtype(x.dtype, np.integer)


def _bad_values(values: ArrayLike) -> list[int]:
    """The first few distinct offending values, for error messages."""
    uniq = torch.unique(values).cpu().tolist() if isinstance(values, Tensor) else np.unique(values).tolist()
    return uniq[:_MAX_BAD_VALUES_SHOWN]


def confusion_from_labels(
    pred: ArrayLike,
    gt: ArrayLike,
    num_classes: int,
    ignore_label: int = 255,
    name: str | None = None,
) -> np.ndarray:
    """Count (ground truth, prediction) pairs of one image.

    Args:
        pred: (H, W) predicted class ids in [0, num_classes); any integer dtype, numpy or torch (any device).
        gt: (H, W) ground-truth class ids in [0, num_classes) or ``ignore_label``; same kinds as ``pred``.
        num_classes: N, the number of classes.
        ignore_label: ground-truth value of pixels that are skipped.
        name: image name used in error messages (e.g. the file name).
    Returns:
        (N, N) int64 confusion matrix, rows = ground truth, columns = prediction, on the CPU.
    Raises:
        ValueError: naming the image, when the inputs are not 2-D, differ in shape, are not integers, or
            hold ids out of range (ground truth other than ``ignore_label``; predictions at any pixel).
    """
    where = f"image {name!r}" if name is not None else "image"
    for what, x in (("pred", pred), ("gt", gt)):
        if not isinstance(x, np.ndarray | Tensor):
            raise ValueError(f"{where}: {what} must be a numpy array or torch tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{where}: {what} must be 2-D (H, W), got shape {tuple(x.shape)}")
        if not _is_integer_dtype(x):
            raise ValueError(f"{where}: {what} must hold integer class ids, got dtype {x.dtype}")
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"{where}: pred shape {tuple(pred.shape)} != gt shape {tuple(gt.shape)}")

    if isinstance(pred, Tensor) or isinstance(gt, Tensor):
        # Count on the tensors' device; only the N*N counts travel to the CPU.
        device = pred.device if isinstance(pred, Tensor) else gt.device
        p = torch.as_tensor(pred, device=device).to(torch.int64).reshape(-1)
        g = torch.as_tensor(gt, device=device).to(torch.int64).reshape(-1)
    else:
        p = pred.astype(np.int64, copy=False).reshape(-1)
        g = gt.astype(np.int64, copy=False).reshape(-1)

    bad_pred = (p < 0) | (p >= num_classes)
    if bad_pred.any():
        raise ValueError(
            f"{where}: predictions outside [0, {num_classes}): {_bad_values(p[bad_pred])}"
            f" ({int(bad_pred.sum())} pixels)"
        )
    keep = g != ignore_label
    g, p = g[keep], p[keep]
    bad_gt = (g < 0) | (g >= num_classes)
    if bad_gt.any():
        raise ValueError(
            f"{where}: ground-truth labels outside [0, {num_classes}) other than ignore_label "
            f"{ignore_label}: {_bad_values(g[bad_gt])} ({int(bad_gt.sum())} pixels)"
        )

    index = num_classes * g + p  # (P,) row-major position of (gt, pred) in the N x N matrix
    if isinstance(index, Tensor):
        counts = torch.bincount(index, minlength=num_classes**2).cpu().numpy()
    else:
        counts = np.bincount(index, minlength=num_classes**2)
    return counts.astype(np.int64, copy=False).reshape(num_classes, num_classes)


# --------------------------------------------------------------------------------------------------
# Confusion matrix -> metrics (pure functions)
# --------------------------------------------------------------------------------------------------


def _check_confusion(conf: np.ndarray) -> np.ndarray:
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square (N, N), got shape {conf.shape}")
    return conf.astype(np.float64)


def _counts(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tp, pos_gt and pos_pred, each (N,) float64, from an (N, N) rows=GT matrix."""
    conf = _check_confusion(conf)
    return np.diag(conf).copy(), conf.sum(axis=1), conf.sum(axis=0)


def _mean_over(values: np.ndarray, valid: np.ndarray) -> float:
    """Mean of ``values[valid]``; NaN (without a warning) when nothing is valid."""
    return float(values[valid].mean()) if valid.any() else math.nan


def iou_from_confusion(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU, detectron2 convention (classes without ground truth are invalid).

    Args:
        conf: (N, N) counts, rows = ground truth, columns = prediction.
    Returns:
        ious (N,) float64 in [0, 1], NaN where invalid, and valid (N,) bool: ``pos_gt > 0 and union > 0``.
    """
    tp, pos_gt, pos_pred = _counts(conf)
    union = pos_gt + pos_pred - tp
    valid = (pos_gt > 0) & (union > 0)
    ious = np.full(tp.shape, np.nan)
    ious[valid] = tp[valid] / union[valid]
    return ious, valid


def accuracy_from_confusion(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class pixel accuracy (recall), detectron2 convention.

    Args:
        conf: (N, N) counts, rows = ground truth, columns = prediction.
    Returns:
        accs (N,) float64 in [0, 1] = tp / pos_gt, NaN where invalid, and valid (N,) bool: ``pos_gt > 0``.
    """
    tp, pos_gt, _ = _counts(conf)
    valid = pos_gt > 0
    accs = np.full(tp.shape, np.nan)
    accs[valid] = tp[valid] / pos_gt[valid]
    return accs, valid


def cityscapes_iou_from_confusion(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU, cityscapesScripts convention.

    A class absent from the ground truth but predicted has IoU 0 and is valid; only a class with
    ``tp + fp + fn == 0`` (absent from both) is invalid.

    Args:
        conf: (N, N) counts, rows = ground truth, columns = prediction.
    Returns:
        ious (N,) float64 in [0, 1], NaN where invalid, and valid (N,) bool: ``tp + fp + fn > 0``.
    """
    tp, pos_gt, pos_pred = _counts(conf)
    denom = pos_gt + pos_pred - tp  # tp + fn + fp
    valid = denom > 0
    ious = np.full(tp.shape, np.nan)
    ious[valid] = tp[valid] / denom[valid]
    return ious, valid


def category_confusion(conf: np.ndarray, categories: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Pool a class confusion matrix into a category confusion matrix.

    cityscapesScripts' category IoU is the IoU of the union of the member classes: tp counts every
    (gt, pred) pair inside the category, so the category IoU is the class IoU of the pooled matrix.

    Args:
        conf: (N, N) counts, rows = ground truth, columns = prediction.
        categories: N category names, one per class.
    Returns:
        (K, K) int64 pooled counts and the K category names in order of first appearance.
    """
    conf = np.asarray(conf)
    if len(categories) != conf.shape[0]:
        raise ValueError(
            f"need one category per class: {len(categories)} categories for {conf.shape[0]} classes"
        )
    names = list(dict.fromkeys(categories))
    member = np.zeros((len(names), len(categories)), dtype=np.int64)  # (K, N) one-hot membership
    member[[names.index(c) for c in categories], np.arange(len(categories))] = 1
    return member @ conf.astype(np.int64) @ member.T, names


def cityscapes_train_id_categories(num_classes: int = _NUM_CITYSCAPES_CLASSES) -> list[str]:
    """Cityscapes category name of each train id, from cityscapesScripts' label table.

    Args:
        num_classes: must be 19 (the evaluated Cityscapes train ids 0..18).
    Returns:
        19 category names (``flat``, ``construction``, ``object``, ``nature``, ``sky``, ``human``,
        ``vehicle``), indexed by train id.
    """
    if num_classes != _NUM_CITYSCAPES_CLASSES:
        raise ValueError(f"Cityscapes train ids need num_classes=19, got {num_classes}")
    from cityscapesscripts.helpers.labels import labels  # deferred: only the Cityscapes family needs it

    by_train_id = {lb.trainId: lb.category for lb in labels if not lb.ignoreInEval}
    return [by_train_id[t] for t in range(num_classes)]


def _class_keys(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries, expected num_classes={num_classes}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class_names must be unique (they become metric keys), duplicates: {dup}")
    return names


def semseg_metrics(conf: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """detectron2 ``SemSegEvaluator`` metrics, in percent.

    With tp = diag, pos_gt = row sums, pos_pred = column sums:
    ``IoU = tp / (pos_gt + pos_pred - tp)``, ``ACC = tp / pos_gt``; mIoU and mACC average over classes with
    ground-truth pixels; ``fwIoU = sum(IoU * pos_gt / sum(pos_gt))`` over the same classes;
    ``pACC = sum(tp) / sum(pos_gt)``.

    Args:
        conf: (N, N) counts, rows = ground truth, columns = prediction.
        class_names: N names for the per-class keys; default ``"0" .. "N-1"``.
    Returns:
        ``mIoU``, ``fwIoU``, ``IoU-<class>`` x N, ``mACC``, ``pACC``, ``ACC-<class>`` x N, each in [0, 100]
        or NaN (classes without ground truth; every key when the matrix is empty).
    """
    ious, iou_valid = iou_from_confusion(conf)
    accs, acc_valid = accuracy_from_confusion(conf)
    tp, pos_gt, _ = _counts(conf)
    keys = _class_keys(len(tp), class_names)
    total = pos_gt.sum()
    fw_iou = float((ious[iou_valid] * pos_gt[iou_valid]).sum() / total) if total > 0 else math.nan
    p_acc = float(tp.sum() / total) if total > 0 else math.nan

    res: dict[str, float] = {"mIoU": 100 * _mean_over(ious, iou_valid), "fwIoU": 100 * fw_iou}
    res.update({f"IoU-{k}": 100 * float(v) for k, v in zip(keys, ious)})
    res["mACC"] = 100 * _mean_over(accs, acc_valid)
    res["pACC"] = 100 * p_acc
    res.update({f"ACC-{k}": 100 * float(v) for k, v in zip(keys, accs)})
    return res


def cityscapes_metrics(conf: np.ndarray, categories: Sequence[str] | None = None) -> dict[str, float]:
    """cityscapesScripts class and category averages, in percent.

    Args:
        conf: (N, N) counts, rows = ground truth, columns = prediction.
        categories: N category names (one per class) for ``IoU_sup``; None leaves ``IoU_sup`` out.
    Returns:
        ``IoU`` (mean class IoU over classes with tp + fp + fn > 0) and, with categories, ``IoU_sup`` (the
        same over pooled categories); in [0, 100], NaN when the matrix is empty.
    """
    ious, valid = cityscapes_iou_from_confusion(conf)
    res = {"IoU": 100 * _mean_over(ious, valid)}
    if categories is not None:
        cat_ious, cat_valid = cityscapes_iou_from_confusion(category_confusion(conf, categories)[0])
        res["IoU_sup"] = 100 * _mean_over(cat_ious, cat_valid)
    return res


# --------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------


def _all_reduce_sum(counts: np.ndarray) -> np.ndarray:
    """Sum an int64 array over all processes of the default group (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    # gloo reduces CPU tensors; NCCL needs them on this rank's GPU.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buf = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64)).to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu().numpy()


class SemSegEvaluator:
    """Accumulate a confusion matrix over images and report segmentation metrics.

    Example::

        evaluator = SemSegEvaluator(19, class_names=names, convention="cityscapes")
        for image, gt, file_name in data:
            evaluator.process(pred_from_scores(model(image)), gt, name=file_name)
        metrics = evaluator.evaluate()["sem_seg"]  # {"mIoU": ..., "IoU": ..., ...}

    Args:
        num_classes: N, number of evaluated classes (train ids 0..N-1).
        ignore_label: ground-truth id of pixels that are skipped; must lie outside [0, N).
        class_names: N names for the per-class keys (``IoU-<name>``); default the index as a string.
        convention: ``"detectron2"`` or ``"cityscapes"`` (adds ``IoU`` and, with categories, ``IoU_sup``).
        categories: N category names for ``IoU_sup``; by default cityscapesScripts' table when the
            convention is ``"cityscapes"`` and N == 19, otherwise no ``IoU_sup``.
        distributed: sum the confusion matrix over all processes in :meth:`evaluate` when
            ``torch.distributed`` is initialised. Then every rank must call :meth:`evaluate`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: int = 255,
        class_names: Sequence[str] | None = None,
        convention: Convention = "detectron2",
        *,
        categories: Sequence[str] | None = None,
        distributed: bool = True,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} collides with a class id in [0, {num_classes})")
        if convention not in _CONVENTIONS:
            raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")
        if categories is not None and len(categories) != num_classes:
            raise ValueError(f"categories has {len(categories)} entries, expected num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_names = _class_keys(num_classes, class_names)
        self.convention: Convention = convention
        if categories is None and convention == "cityscapes" and num_classes == _NUM_CITYSCAPES_CLASSES:
            categories = cityscapes_train_id_categories(num_classes)
        self.categories = list(categories) if categories is not None else None
        self.distributed = distributed
        self.reset()

    def reset(self) -> None:
        """Forget every processed image."""
        self._conf = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self._num_images = 0

    @property
    def confusion_matrix(self) -> np.ndarray:
        """(N, N) int64 copy of this process's counts, rows = ground truth, columns = prediction."""
        return self._conf.copy()

    @property
    def num_images(self) -> int:
        """Number of images processed by this process."""
        return self._num_images

    def process(self, pred: ArrayLike, gt: ArrayLike, name: str | None = None) -> None:
        """Add one image.

        Args:
            pred: (H, W) predicted ids in [0, N); see :func:`pred_from_scores` for score maps.
            gt: (H, W) ground-truth ids in [0, N) or ``ignore_label``.
            name: image name for error messages; default ``"#<index>"``.
        """
        label = name if name is not None else f"#{self._num_images}"
        self._conf += confusion_from_labels(pred, gt, self.num_classes, self.ignore_label, name=label)
        self._num_images += 1

    def add_confusion(self, matrix: ArrayLike, num_images: int = 0) -> None:
        """Add counts accumulated elsewhere.

        Args:
            matrix: (N, N) non-negative integer counts, rows = ground truth, columns = prediction.
            num_images: number of images those counts come from.
        """
        if isinstance(matrix, Tensor):
            matrix = matrix.detach().cpu().numpy()
        matrix = np.asarray(matrix)
        if matrix.shape != self._conf.shape:
            raise ValueError(f"confusion matrix must have shape {self._conf.shape}, got {matrix.shape}")
        if not np.issubdtype(matrix.dtype, np.integer):
            raise ValueError(f"confusion matrix must hold integer counts, got dtype {matrix.dtype}")
        if (matrix < 0).any():
            raise ValueError("confusion matrix has negative counts")
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        self._conf += matrix.astype(np.int64)
        self._num_images += int(num_images)

    def merge(self, other: SemSegEvaluator) -> None:
        """Add another evaluator's counts (same classes and ignore label) to this one."""
        if (other.num_classes, other.ignore_label) != (self.num_classes, self.ignore_label):
            raise ValueError(
                f"cannot merge an evaluator with num_classes={other.num_classes}, ignore_label="
                f"{other.ignore_label} into one with num_classes={self.num_classes}, "
                f"ignore_label={self.ignore_label}"
            )
        self.add_confusion(other._conf, other._num_images)

    def synchronize(self) -> tuple[np.ndarray, int]:
        """Counts summed over all processes, without changing this evaluator's own counts.

        A collective call when distributed: every rank must call it.

        Returns:
            (N, N) int64 confusion matrix and the total number of images.
        """
        packed = np.append(self._conf.reshape(-1), self._num_images)  # (N*N + 1,) one all-reduce
        if self.distributed:
            packed = _all_reduce_sum(packed)
        return packed[:-1].reshape(self._conf.shape).copy(), int(packed[-1])

    def evaluate(self) -> dict[str, dict[str, float | int]]:
        """Metrics over every processed image (of every process when distributed).

        Returns:
            ``{"sem_seg": metrics}``: :func:`semseg_metrics` (+ :func:`cityscapes_metrics` for the
            ``"cityscapes"`` convention) in percent, plus ``num_images`` (int).
        """
        conf, num_images = self.synchronize()
        if conf.sum() == 0:
            logger.warning("no ground-truth pixels were evaluated (%d images): metrics are NaN", num_images)
        res: dict[str, float | int] = dict(semseg_metrics(conf, self.class_names))
        if self.convention == "cityscapes":
            res.update(cityscapes_metrics(conf, self.categories))
        res["num_images"] = num_images
        logger.info(
            "sem_seg over %d images: mIoU %.2f%s",
            num_images,
            res["mIoU"],
            f", IoU {res['IoU']:.2f}" if "IoU" in res else "",
        )
        return {"sem_seg": res}
