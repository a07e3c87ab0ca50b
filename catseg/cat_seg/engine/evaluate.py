"""Evaluate a CAT-Seg model (with or without an adapter) on registered datasets.

:func:`evaluate_datasets` is what ``train_net.py`` runs on ``DATASETS.TEST``; the SemLA orchestrator can
reuse it, or :func:`inference_on_dataset` with its own loader and evaluator. Per dataset:

1. the class-text features are computed once (the original caches them too) and passed to every
   forward pass;
2. each image is predicted at the size its record asks for (the original size; 512x1024 for the
   resized Cityscapes mapper, whose predictions are then brought to the 1024x2048 label with a
   nearest-exact resize, as the original's ``ResizedCityscapesSemSegEvaluator`` does);
3. the argmax of the class probabilities is compared with the label at its original size by
   :class:`~cat_seg.evaluation.SemSegEvaluator`, with the metric convention of the dataset
   (cityscapesScripts ``IoU`` for ACDC, MUSES and Cityscapes; detectron2 ``mIoU`` otherwise).

With ``tta`` (:class:`~cat_seg.test_time_augmentation.TTASettings`, ``TEST.AUG.*``) each batch is predicted
from every test-time view and the views' probabilities are averaged
(:func:`~cat_seg.test_time_augmentation.predict_with_tta`); the text features are still computed once.

Under ``torch.distributed`` each rank predicts its shard and the evaluator sums the confusion matrices,
so every rank must call these functions and every rank gets the same numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data import (
    InferenceSampler,
    MappedDataset,
    build_test_loader,
    get_dataset,
    load_records,
    mapper_from_cfg,
    trivial_batch_collator,
)
from ..data.transforms import resize_nearest_exact
from ..evaluation import SemSegEvaluator
from ..progress import progress as report_progress
from ..test_time_augmentation import TTASettings, predict_with_tta
from .io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [
    "build_eval_loader",
    "check_vocabulary",
    "copypaste_lines",
    "evaluate_datasets",
    "format_results_table",
    "inference_on_dataset",
    "label_prediction",
    "reported_metric",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ``CATSeg`` inside DistributedDataParallel and/or LoRA wrappers (native or PEFT).

    The LoRA layers are injected into the base model in place, so the unwrapped model still computes
    with the active adapter.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model):
        model = get_base_model()
    return model


def reported_metric(sem_seg: Mapping[str, Any]) -> tuple[str, float]:
    """The number SemLA reports for a result: ``IoU`` where present (Cityscapes family), else ``mIoU``."""
    key = "IoU" if "IoU" in sem_seg else "mIoU"
    return key, float(sem_seg[key])


def check_vocabulary(model_class_names: Sequence[str], dataset: str, *, source: str = "the model") -> None:
    """Refuse to evaluate ``dataset`` with a model whose test classes are not the dataset's classes.

    Args:
        model_class_names: the model's test vocabulary (index = output channel).
        dataset: a registered dataset name.
        source: where the vocabulary comes from, for the message.
    Raises:
        ValueError: naming the dataset, its class JSON and both class counts.
    """
    spec = get_dataset(dataset)
    expected = spec.class_names()
    if list(model_class_names) != list(expected):
        raise ValueError(
            f"dataset {dataset!r} is labelled with the {len(expected)} classes of {spec.class_json}, but "
            f"{source} has a different vocabulary of {len(model_class_names)} classes; set "
            f"MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON {spec.class_json}"
        )


def build_eval_loader(
    records: Sequence[dict[str, Any]], mapper: Any, *, batch_size: int = 1, num_workers: int = 0
) -> DataLoader:
    """Sequential loader over this rank's contiguous shard (batch size 1 as the original, or more)."""
    if batch_size < 1:
        raise ValueError(f"evaluation batch size must be >= 1, got {batch_size}")
    if batch_size == 1:
        return build_test_loader(records, mapper, num_workers=num_workers)
    return DataLoader(
        MappedDataset(records, mapper),
        batch_size=batch_size,
        sampler=InferenceSampler(len(records)),
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
    )


def label_prediction(probs: Tensor, label: Tensor, *, resize_to_label: bool) -> np.ndarray | Tensor:
    """(T, H, W) probabilities -> (H, W) class ids on the CPU, at the label's size if asked."""
    pred = probs.argmax(dim=0).cpu()
    if resize_to_label and tuple(pred.shape) != tuple(label.shape):
        return resize_nearest_exact(pred.numpy(), (int(label.shape[0]), int(label.shape[1])))
    return pred


@torch.no_grad()
def inference_on_dataset(
    model: nn.Module,
    loader: Iterable[list[dict[str, Any]]],
    evaluator: SemSegEvaluator,
    *,
    text_features: Tensor | None = None,
    resize_to_label: bool = False,
    desc: str = "evaluation",
    progress: bool = True,
    tta: TTASettings | None = None,
) -> dict[str, dict[str, float | int]]:
    """Predict every batch of ``loader`` and return ``evaluator.evaluate()``.

    The model is put in eval mode for the loop and restored afterwards.

    Args:
        model: a ``CATSeg`` (PEFT and DDP wrappers are unwrapped).
        loader: yields lists of test-mapper dicts with ``image``, ``height``/``width`` and ``sem_seg``.
        evaluator: a fresh evaluator of the dataset (collective ``evaluate()`` under torch.distributed).
        text_features: (T, P, C) class-text features; computed once here when None.
        resize_to_label: bring predictions to the label size (nearest-exact) when they differ (the
            resized Cityscapes mapper); otherwise a size mismatch is an error of the evaluator.
        desc: what is evaluated, for the progress output.
        progress: show progress on rank 0 (a bar on a terminal, else a log line every 30 s).
        tta: test-time augmentation: every batch predicted from these views, probabilities averaged
            (None: one forward pass per batch).
    Returns:
        ``{"sem_seg": {...}}`` as :meth:`SemSegEvaluator.evaluate` returns it.
    """
    catseg = unwrap_model(model)
    was_training = catseg.training
    catseg.eval()
    try:
        if text_features is None:
            text_features = catseg.text_features()
        start, count = time.perf_counter(), 0
        sampler = getattr(loader, "sampler", None)  # a DataLoader's sampler yields this process's images
        total = len(sampler) if sampler is not None and hasattr(sampler, "__len__") else None
        batches = report_progress(
            loader,
            total=total,
            desc=desc,
            unit="img",
            enabled=progress and _is_main_process(),
            log=logger,
            weight=len,
        )
        for batch in batches:
            outputs = predict_with_tta(lambda views: catseg(views, text_features=text_features), batch, tta)
            for inputs, output in zip(batch, outputs):
                if "sem_seg" not in inputs:
                    raise ValueError(f"{inputs.get('file_name')}: no label to evaluate against")
                label = inputs["sem_seg"]
                pred = label_prediction(output["sem_seg"], label, resize_to_label=resize_to_label)
                evaluator.process(pred, label, name=str(inputs.get("file_name")))
                count += 1
        seconds = time.perf_counter() - start
        here = (
            " in this process"
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            else ""
        )
        logger.info(
            "predicted %d images%s in %.1f s (%.3f s/image)", count, here, seconds, seconds / max(count, 1)
        )
    finally:
        catseg.train(was_training)
    return evaluator.evaluate()


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def evaluate_datasets(
    cfg: Any,
    model: nn.Module,
    root: str | os.PathLike[str] | None = None,
    *,
    records: Mapping[str, Sequence[dict[str, Any]]] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 1,
    num_workers: int | None = None,
    extra: Mapping[str, Any] | None = None,
    tta: TTASettings | None = None,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Evaluate ``model`` on every dataset of ``DATASETS.TEST``.

    Args:
        cfg: a resolved config (``DATASETS.TEST``, the test mapper keys, ``DATALOADER.NUM_WORKERS``).
        model: a ``CATSeg`` built with the datasets' class JSON as ``TEST_CLASS_JSON`` (wrappers are
            unwrapped).
        root: the dataset root; not needed for datasets given in ``records``.
        records: preloaded records per dataset name (else :func:`~cat_seg.data.load_records`).
        output_dir: when given, rank 0 writes ``<output_dir>/inference/<dataset>/metrics.json``
            (atomically): ``{"dataset", "metric", "value", "sem_seg": {...}}`` plus ``extra``; with
            ``tta``, ``<output_dir>/inference_TTA/<dataset>/metrics.json`` (the original's folder) with a
            ``"tta"`` entry describing the views.
        batch_size: images per forward pass (the original: 1).
        num_workers: loader workers; default ``DATALOADER.NUM_WORKERS``.
        extra: more keys for ``metrics.json`` (e.g. the iteration).
        tta: predict every image from these test-time views (None: the plain single view).
    Returns:
        ``{dataset: {"sem_seg": {...}}}`` in ``DATASETS.TEST`` order.
    Raises:
        ValueError: the model's vocabulary differs from a dataset's classes (before any prediction).
    """
    catseg = unwrap_model(model)
    workers = int(cfg.DATALOADER.NUM_WORKERS) if num_workers is None else num_workers
    names = list(cfg.DATASETS.TEST)
    for name in names:
        check_vocabulary(catseg.test_class_names, name)
    results: dict[str, dict[str, dict[str, float | int]]] = {}
    for name in names:
        spec = get_dataset(name)
        if records is not None and name in records:
            dataset_records = list(records[name])
        elif root is not None:
            dataset_records = load_records(name, Path(root))
        else:
            raise ValueError(f"no records for {name!r}: pass the dataset root")
        mapper = mapper_from_cfg(cfg, is_train=False, num_classes=spec.num_classes)
        loader = build_eval_loader(dataset_records, mapper, batch_size=batch_size, num_workers=workers)
        evaluator = SemSegEvaluator(
            spec.num_classes,
            spec.ignore_label,
            class_names=spec.class_names(),
            convention=spec.metric_convention,
        )
        logger.info(
            "evaluating on %s (%d images)%s",
            name,
            len(dataset_records),
            f" with test-time augmentation, {tta.describe()}" if tta is not None else "",
        )
        # text_features=None: computed once for the dataset inside inference_on_dataset
        result = inference_on_dataset(
            catseg,
            loader,
            evaluator,
            resize_to_label=spec.resize_to is not None,
            desc=name if tta is None else f"{name} (TTA)",
            tta=tta,
        )
        results[name] = result
        key, value = reported_metric(result["sem_seg"])
        logger.info("%s: %s = %.2f", name, key, value)
        if output_dir is not None and _is_main_process():
            folder = "inference" if tta is None else "inference_TTA"
            described = {} if tta is None else {"tta": _tta_record(tta)}
            atomic_write_json(
                Path(output_dir) / folder / name / "metrics.json",
                {
                    "dataset": name,
                    "metric": key,
                    "value": value,
                    **(extra or {}),
                    **described,
                    "sem_seg": result["sem_seg"],
                },
            )
    return results


def _tta_record(tta: TTASettings) -> dict[str, Any]:
    return {
        "min_sizes": list(tta.min_sizes),
        "max_size": tta.max_size,
        "flip": tta.flip,
        "views": len(tta.views),
    }


def format_results_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """A plain-text table: one row per dataset with the reported metric, mIoU, pixel accuracy, images."""
    header = f"{'dataset':<34} {'metric':<6} {'value':>7} {'mIoU':>7} {'pACC':>7} {'images':>7}"
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        metrics = result["sem_seg"]
        key, value = reported_metric(metrics)
        lines.append(
            f"{name:<34} {key:<6} {value:7.2f} {float(metrics.get('mIoU', float('nan'))):7.2f} "
            f"{float(metrics.get('pACC', float('nan'))):7.2f} {int(metrics.get('num_images', 0)):7d}"
        )
    return "\n".join(lines)


def copypaste_lines(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """detectron2's ``print_csv_format`` lines (``copypaste: ...``), which ``eval.sh`` greps from the log."""
    lines = []
    for name, result in results.items():
        metrics = result["sem_seg"]
        keys = [k for k in ("IoU", "IoU_sup", "mIoU", "fwIoU", "mACC", "pACC") if k in metrics]
        lines.append(f"copypaste: Dataset: {name}")
        lines.append("copypaste: " + ",".join(keys))
        lines.append("copypaste: " + ",".join(f"{float(metrics[k]):.4f}" for k in keys))
    return lines
