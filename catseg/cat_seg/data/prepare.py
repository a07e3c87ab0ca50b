"""Preparation of label folders the loaders expect but the official downloads do not ship.

``prepare_ade20k`` converts the official ADE20K-150 ``annotations/`` (0 = "other", k = class k) into
``annotations_detectron2/`` (k -> k - 1, 0 -> 255), the folder the original's
``prepare_ade20k_sem_seg.py`` writes and ``a150_sem_seg_*`` reads.

Command line: ``python -m cat_seg.data.prepare ade20k --root DIR``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .io import DatasetError, MissingDataError, read_label, write_label

logger = logging.getLogger(__name__)

ADE20K_NUM_CLASSES = 150


def ade20k_to_detectron2(label: np.ndarray) -> np.ndarray:
    """Official ADE20K-150 ids (0 = other, 1-150) -> contiguous ids 0-149 with 255 = ignore.

    Args:
        label: (H, W) integer map with values in [0, 150].
    Returns:
        (H, W) uint8 map: ``label - 1`` with 0 mapped to 255.
    """
    return (np.asarray(label).astype(np.int64) - 1).astype(np.uint8)  # 0 - 1 wraps to 255 as uint8


def prepare_ade20k(root: str | Path, *, overwrite: bool = False) -> tuple[int, int]:
    """Write ``ADEChallengeData2016/annotations_detectron2/{training,validation}`` from ``annotations/``.

    Args:
        root: dataset root holding ``ADEChallengeData2016/``.
        overwrite: rewrite files that already exist (otherwise they are kept).
    Returns:
        (label files written, existing files kept).
    Raises:
        MissingDataError: ``annotations/<split>`` is missing.
        DatasetError: a label is unreadable or holds ids above 150.
    """
    base = Path(root) / "ADEChallengeData2016"
    written = kept = 0
    for split in ("training", "validation"):
        src_dir, dst_dir = base / "annotations" / split, base / "annotations_detectron2" / split
        if not src_dir.is_dir():
            raise MissingDataError(f"{src_dir}: official ADE20K annotations folder does not exist")
        dst_dir.mkdir(parents=True, exist_ok=True)
        split_written = split_kept = 0
        for src in sorted(src_dir.glob("*.png")):
            dst = dst_dir / src.name
            if dst.exists() and not overwrite:
                split_kept += 1
                continue
            label = read_label(src)
            if label.size and (label.min() < 0 or label.max() > ADE20K_NUM_CLASSES):
                raise DatasetError(
                    f"{src}: ADE20K ids must lie in [0, {ADE20K_NUM_CLASSES}], got max {label.max()}"
                )
            tmp = dst.with_name(dst.name + ".tmp.png")
            write_label(tmp, ade20k_to_detectron2(label))
            os.replace(tmp, dst)
            split_written += 1
        logger.info(
            "ADE20K %s: %d labels written to %s, %d existing kept", split, split_written, dst_dir, split_kept
        )
        written, kept = written + split_written, kept + split_kept
    return written, kept


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m cat_seg.data.prepare``."""
    parser = argparse.ArgumentParser(description="Prepare dataset label folders the loaders expect.")
    parser.add_argument("dataset", choices=["ade20k"], help="which dataset to prepare")
    parser.add_argument(
        "--root", type=Path, default=None, help="dataset root (default: $DETECTRON2_DATASETS)"
    )
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing output files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preparation; returns the exit status."""
    from ..cli import add_debug_flag, report_errors
    from .registry import default_root

    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        root = args.root if args.root is not None else default_root()
        written, kept = prepare_ade20k(root, overwrite=args.overwrite)
        where = Path(root) / "ADEChallengeData2016" / "annotations_detectron2"
        note = f"; kept {kept} existing ones (--overwrite rewrites them)" if kept else ""
        print(f"wrote {written} label files under {where}{note}")
        return 0

    return report_errors("cat_seg.data.prepare", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
