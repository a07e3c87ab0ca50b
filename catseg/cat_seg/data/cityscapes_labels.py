"""Cityscapes labelId <-> trainId conversion, from the official table in ``cityscapesscripts``.

ACDC, MUSES and Cityscapes store two label maps per image: ``*_labelTrainIds.png`` (trainIds 0-18,
255 = ignore; what training and the detectron2-style metrics use) and ``*_labelIds.png`` (the 34
Cityscapes ids; what cityscapesScripts' evaluation reads). These helpers convert between the two with
look-up tables built from ``cityscapesscripts.helpers.labels`` (never a copied table).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

NUM_TRAIN_IDS = 19
IGNORE_TRAIN_ID = 255


@lru_cache(maxsize=1)
def label_id_to_train_id_lut() -> np.ndarray:
    """(256,) int64 table: Cityscapes labelId -> trainId (255 for ids that are ignored in evaluation)."""
    from cityscapesscripts.helpers.labels import labels

    lut = np.full(256, IGNORE_TRAIN_ID, dtype=np.int64)
    for lab in labels:
        if 0 <= lab.id < 256 and 0 <= lab.trainId < NUM_TRAIN_IDS and not lab.ignoreInEval:
            lut[lab.id] = lab.trainId
    lut.setflags(write=False)
    return lut


@lru_cache(maxsize=1)
def train_id_to_label_id_lut() -> np.ndarray:
    """(256,) int64 table: trainId 0-18 -> Cityscapes labelId; every other value -> 255.

    This is the mapping the original's ACDC/Cityscapes evaluators apply to predictions before running
    cityscapesScripts: trainIds whose label is ``ignoreInEval`` are skipped and stay 255.
    """
    from cityscapesscripts.helpers.labels import labels

    lut = np.full(256, 255, dtype=np.int64)
    for lab in labels:
        if 0 <= lab.trainId < NUM_TRAIN_IDS and not lab.ignoreInEval:
            lut[lab.trainId] = lab.id
    lut.setflags(write=False)
    return lut


def valid_label_ids() -> np.ndarray:
    """(34,) the labelIds that can appear in a ``*_labelIds.png`` (0-33; license plate -1 cannot)."""
    from cityscapesscripts.helpers.labels import labels

    return np.array(sorted(lab.id for lab in labels if 0 <= lab.id < 256), dtype=np.int64)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes labelId map to trainIds.

    Args:
        label_ids: (H, W) integer map of labelIds in [0, 255].
    Returns:
        (H, W) int64 map of trainIds 0-18, 255 where the labelId is ignored in evaluation.
    """
    label_ids = np.asarray(label_ids)
    if label_ids.size and (label_ids.min() < 0 or label_ids.max() > 255):
        raise ValueError(f"labelIds must lie in [0, 255], got [{label_ids.min()}, {label_ids.max()}]")
    return label_id_to_train_id_lut()[label_ids]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map a trainId map (e.g. a prediction) to Cityscapes labelIds.

    Args:
        train_ids: (H, W) integer map of trainIds; values outside 0-18 (e.g. 255) stay 255.
    Returns:
        (H, W) int64 map of labelIds.
    """
    train_ids = np.asarray(train_ids)
    if train_ids.size and (train_ids.min() < 0 or train_ids.max() > 255):
        raise ValueError(f"trainIds must lie in [0, 255], got [{train_ids.min()}, {train_ids.max()}]")
    return train_id_to_label_id_lut()[train_ids]
