"""Record -> model input: the test mapper (detectron2 ``DatasetMapper(is_train=False)``) and the train
mapper (``MaskFormerSemanticDatasetMapper``), each with the Cityscapes 1024x512 variant.

Output dicts (the model receives a list of them):

- test: ``{"image": (3, H', W') uint8, "height", "width", "file_name", "sem_seg": (H, W) int64, ...}``.
  ``height``/``width`` are the size the model returns its prediction at (the original image size, or
  512x1024 for the Cityscapes variant as in the original); ``sem_seg`` is the label at its
  **original** resolution (what evaluation compares against). A prediction of another size is brought
  to ``sem_seg``'s size with ``transforms.resize_nearest_exact`` (the original's
  ``ResizedCityscapesSemSegEvaluator`` does exactly this, 512x1024 -> 1024x2048).
- train: ``{"image": (3, S, S) uint8, "sem_seg": (S, S) int64, "file_name", ...}`` after resize, crop,
  colour jitter, flip and padding (image with 128, label with the ignore id).

Images stay uint8 (0-255, channel order ``image_format``); the model normalises them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from . import transforms as T
from .io import DatasetError, check_label_values, read_image, read_label

logger = logging.getLogger(__name__)

CITYSCAPES_RESIZE = (1024, 512)
"""(width, height) of the original's ``resized_mask_former_semantic`` mappers."""

IMAGE_PAD_VALUE = 128


def _read_pair(
    record: dict[str, Any],
    image_format: Literal["RGB", "BGR"],
    *,
    need_label: bool,
    num_classes: int | None,
    ignore_label: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a record's image (H, W, 3) and label (H, W), checking sizes and (optionally) label ids."""
    file_name = record["file_name"]
    image = read_image(file_name, format=image_format)
    h, w = image.shape[:2]
    if "height" in record and "width" in record and (record["height"], record["width"]) != (h, w):
        raise DatasetError(
            f"{file_name}: image is {h}x{w} but the dataset record says {record['height']}x{record['width']}"
        )
    label_file = record.get("sem_seg_file_name")
    if label_file is None:
        if need_label:
            raise DatasetError(f"{file_name}: record has no 'sem_seg_file_name' (a label is required)")
        return image, None
    label = read_label(label_file)
    if label.shape != (h, w):
        raise DatasetError(
            f"{label_file}: label is {label.shape[0]}x{label.shape[1]} but image {file_name} is {h}x{w}"
        )
    if num_classes is not None:
        check_label_values(label, num_classes, ignore_label, path=label_file)
    return image, label


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class SemSegTestMapper:
    """Evaluation mapper: read, (optionally) fixed-resize, resize shortest edge; label kept at full size.

    Args:
        min_size: ``INPUT.MIN_SIZE_TEST`` (0 = no resize).
        max_size: ``INPUT.MAX_SIZE_TEST``.
        image_format: ``INPUT.FORMAT``.
        ignore_label: the dataset's ignore id (for the optional value check).
        num_classes: when given, label ids outside [0, num_classes) other than ``ignore_label`` raise.
        resize_to: (width, height) nearest-exact resize of the image first (Cityscapes: (1024, 512));
            ``height``/``width`` of the output are then that size, as in the original.
        load_label: read ``sem_seg_file_name`` when the record has one.
    """

    def __init__(
        self,
        *,
        min_size: int,
        max_size: int,
        image_format: Literal["RGB", "BGR"] = "RGB",
        ignore_label: int = 255,
        num_classes: int | None = None,
        resize_to: tuple[int, int] | None = None,
        load_label: bool = True,
    ) -> None:
        self.min_size = min_size
        self.max_size = max_size
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.num_classes = num_classes
        self.resize_to = resize_to
        self.load_label = load_label

    def __repr__(self) -> str:
        return (
            f"SemSegTestMapper(min_size={self.min_size}, max_size={self.max_size}, "
            f"format={self.image_format}, resize_to={self.resize_to})"
        )

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        """Map one record to ``{"image", "height", "width", "file_name", "sem_seg", ...}``."""
        rec = record if self.load_label else {k: v for k, v in record.items() if k != "sem_seg_file_name"}
        image, label = _read_pair(
            rec,
            self.image_format,
            need_label=False,
            num_classes=self.num_classes,
            ignore_label=self.ignore_label,
        )
        out = dict(record)
        h, w = image.shape[:2]
        if self.resize_to is not None:
            h, w = self.resize_to[1], self.resize_to[0]
            image = T.resize_nearest_exact(image, (h, w))
        new_size = T.shortest_edge_size(h, w, self.min_size, self.max_size)
        image = T.resize_image(image, new_size)
        out.update(image=_to_chw_tensor(image), height=h, width=w)
        if label is not None:
            out["sem_seg"] = torch.from_numpy(label)
        return out


class SemSegTrainMapper:
    """Training mapper (MaskFormer semantic): resize shortest edge -> category-area crop -> SSD colour
    jitter -> horizontal flip (p=0.5) -> pad right/bottom (image 128, label ``ignore_label``).

    Args:
        min_sizes: ``INPUT.MIN_SIZE_TRAIN``.
        max_size: ``INPUT.MAX_SIZE_TRAIN``.
        sampling: ``INPUT.MIN_SIZE_TRAIN_SAMPLING`` (``choice`` or ``range``).
        crop_size: (height, width) of ``INPUT.CROP.SIZE`` when ``CROP.ENABLED`` (type absolute), else None.
        single_category_max_area: ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` (1.0 = no constraint).
        color_aug_ssd: ``INPUT.COLOR_AUG_SSD``.
        size_divisibility: ``INPUT.SIZE_DIVISIBILITY`` (<= 0: no padding).
        ignore_label: ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE`` (255; 65 for Mapillary Vistas).
        image_format: ``INPUT.FORMAT``.
        num_classes: when given, out-of-range label ids raise.
        resize_to: (width, height) nearest-exact resize of image and label first (Cityscapes).
        flip_prob: probability of the horizontal flip.
    """

    def __init__(
        self,
        *,
        min_sizes: Sequence[int],
        max_size: int,
        sampling: Literal["choice", "range"] = "choice",
        crop_size: tuple[int, int] | None = (384, 384),
        single_category_max_area: float = 1.0,
        color_aug_ssd: bool = True,
        size_divisibility: int = 384,
        ignore_label: int = 255,
        image_format: Literal["RGB", "BGR"] = "RGB",
        num_classes: int | None = None,
        resize_to: tuple[int, int] | None = None,
        flip_prob: float = 0.5,
    ) -> None:
        if not min_sizes:
            raise ValueError("min_sizes must not be empty")
        if not 0 < single_category_max_area <= 1:
            raise ValueError(f"single_category_max_area must be in (0, 1], got {single_category_max_area}")
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = max_size
        self.sampling = sampling
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.single_category_max_area = single_category_max_area
        self.color_aug_ssd = color_aug_ssd
        self.size_divisibility = size_divisibility
        self.ignore_label = ignore_label
        self.image_format = image_format
        self.num_classes = num_classes
        self.resize_to = resize_to
        self.flip_prob = flip_prob

    def __repr__(self) -> str:
        return (
            f"SemSegTrainMapper(min_sizes={self.min_sizes}, max_size={self.max_size}, crop={self.crop_size}, "
            f"max_area={self.single_category_max_area}, ssd={self.color_aug_ssd}, "
            f"pad={self.size_divisibility}, ignore={self.ignore_label}, resize_to={self.resize_to})"
        )

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Map one record with randomness drawn from ``rng`` (same rng state -> same output)."""
        image, label = _read_pair(
            record,
            self.image_format,
            need_label=True,
            num_classes=self.num_classes,
            ignore_label=self.ignore_label,
        )
        assert label is not None
        if self.resize_to is not None:
            size = (self.resize_to[1], self.resize_to[0])
            image, label = T.resize_nearest_exact(image, size), T.resize_nearest_exact(label, size)
        short = T.choose_short_edge(self.min_sizes, self.sampling, rng)
        size = T.shortest_edge_size(image.shape[0], image.shape[1], short, self.max_size)
        image, label = T.resize_image(image, size), T.resize_label(label, size)
        if self.crop_size is not None:
            box = T.sample_crop(label, self.crop_size, self.single_category_max_area, self.ignore_label, rng)
            image, label = T.crop(image, box), T.crop(label, box)
        if self.color_aug_ssd:
            image = T.color_aug_ssd(image, rng, image_format=self.image_format)
        if rng.uniform() < self.flip_prob:
            image, label = T.hflip(image), T.hflip(label)
        padded = T.padded_size(image.shape[0], image.shape[1], self.size_divisibility)
        image = T.pad_bottom_right(image, padded, IMAGE_PAD_VALUE)
        label = T.pad_bottom_right(label, padded, self.ignore_label)
        out = dict(record)
        out.update(
            image=_to_chw_tensor(image), sem_seg=torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
        )
        return out


def _cfg_get(node: Any, key: str, default: Any) -> Any:
    return node[key] if key in node else default


def mapper_from_cfg(
    cfg: Any, is_train: bool, *, num_classes: int | None = None
) -> SemSegTestMapper | SemSegTrainMapper:
    """Build the mapper a detectron2-style config asks for.

    Reads ``INPUT.DATASET_MAPPER_NAME`` (``mask_former_semantic``, or ``resized_mask_former_semantic``
    for the Cityscapes 1024x512 variant), ``INPUT.{MIN,MAX}_SIZE_{TRAIN,TEST}``,
    ``INPUT.MIN_SIZE_TRAIN_SAMPLING``, ``INPUT.CROP.{ENABLED,TYPE,SIZE,SINGLE_CATEGORY_MAX_AREA}``,
    ``INPUT.COLOR_AUG_SSD``, ``INPUT.SIZE_DIVISIBILITY``, ``INPUT.FORMAT`` and
    ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``. ``NUM_CLASSES`` is deliberately not read (the original does not
    use it and it is wrong for IDD); pass ``num_classes`` (length of the class JSON) to check label ids.

    Args:
        cfg: yacs ``CfgNode`` with detectron2 key names.
        is_train: training (random augmentation) or test mapper.
        num_classes: optional label-range check.
    """
    inp = cfg.INPUT
    name = inp.DATASET_MAPPER_NAME
    if name == "mask_former_semantic":
        resize_to = None
    elif name == "resized_mask_former_semantic":
        resize_to = CITYSCAPES_RESIZE
    else:
        raise ValueError(
            f"INPUT.DATASET_MAPPER_NAME {name!r} is not supported; use 'mask_former_semantic' or "
            "'resized_mask_former_semantic'"
        )
    image_format = inp.FORMAT
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {image_format!r}")
    ignore_label = int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
    if not is_train:
        return SemSegTestMapper(
            min_size=int(inp.MIN_SIZE_TEST),
            max_size=int(inp.MAX_SIZE_TEST),
            image_format=image_format,
            ignore_label=ignore_label,
            num_classes=num_classes,
            resize_to=resize_to,
        )
    min_sizes = inp.MIN_SIZE_TRAIN
    min_sizes = (int(min_sizes),) if isinstance(min_sizes, int) else tuple(int(s) for s in min_sizes)
    crop_size = None
    max_area = 1.0
    crop = _cfg_get(inp, "CROP", None)
    if crop is not None and crop.ENABLED:
        if crop.TYPE != "absolute":
            raise ValueError(f"INPUT.CROP.TYPE {crop.TYPE!r} is not supported; only 'absolute' is")
        crop_size = (int(crop.SIZE[0]), int(crop.SIZE[1]))
        max_area = float(_cfg_get(crop, "SINGLE_CATEGORY_MAX_AREA", 1.0))
    return SemSegTrainMapper(
        min_sizes=min_sizes,
        max_size=int(inp.MAX_SIZE_TRAIN),
        sampling=_cfg_get(inp, "MIN_SIZE_TRAIN_SAMPLING", "choice"),
        crop_size=crop_size,
        single_category_max_area=max_area,
        color_aug_ssd=bool(_cfg_get(inp, "COLOR_AUG_SSD", False)),
        size_divisibility=int(_cfg_get(inp, "SIZE_DIVISIBILITY", -1)),
        ignore_label=ignore_label,
        image_format=image_format,
        num_classes=num_classes,
        resize_to=resize_to,
    )
