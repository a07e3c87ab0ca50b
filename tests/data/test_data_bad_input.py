"""Bad input gives clear errors naming the file or folder; nothing is skipped silently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cat_seg.data import (
    DatasetError,
    MissingDataError,
    SemSegTestMapper,
    SemSegTrainMapper,
    check_label_values,
    load_records,
    read_image,
    read_label,
)


def test_corrupt_png_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DatasetError, match="broken.png"):
        read_image(bad)
    with pytest.raises(DatasetError, match="broken.png"):
        read_label(bad)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8) + 7).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DatasetError, match="truncated.png"):
        read_image(truncated)


def test_missing_and_rgb_labels(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="nope.png"):
        read_label(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError):  # MissingDataError is also a FileNotFoundError
        read_image(tmp_path / "nope.jpg")
    rgb = tmp_path / "color.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(DatasetError, match="color.png.*single-channel"):
        read_label(rgb)


def test_out_of_range_label_values(synthetic_root: Path, tmp_path: Path) -> None:
    check_label_values(np.array([[0, 18], [255, 3]]), 19, 255)
    with pytest.raises(DatasetError, match="x.png.*19"):
        check_label_values(np.array([[0, 19], [255, 3]]), 19, 255, path="x.png")
    with pytest.raises(DatasetError, match="255"):
        check_label_values(np.array([[255]]), 65, 65)  # Mapillary: 255 is not its ignore id
    record = dict(load_records("bdd_sem_seg_val", synthetic_root)[0])
    label = read_label(record["sem_seg_file_name"])
    label[0, 0] = 40
    bad = tmp_path / "bad_label.png"
    Image.fromarray(label.astype(np.uint8)).save(bad)
    record["sem_seg_file_name"] = str(bad)
    with pytest.raises(DatasetError, match="bad_label.png.*40"):
        SemSegTestMapper(min_size=0, max_size=100, num_classes=19)(record)
    with pytest.raises(DatasetError, match="bad_label.png"):
        SemSegTrainMapper(min_sizes=(40,), max_size=100, num_classes=19)(record, np.random.default_rng(0))
    SemSegTestMapper(min_size=0, max_size=100)(record)  # no num_classes: no check


def test_label_size_and_record_size_mismatch(synthetic_root: Path, tmp_path: Path) -> None:
    record = dict(load_records("a150_sem_seg_val", synthetic_root)[0])
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(small)
    with pytest.raises(DatasetError, match="small.png.*5x5"):
        SemSegTestMapper(min_size=0, max_size=100)(dict(record, sem_seg_file_name=str(small)))
    with pytest.raises(DatasetError, match="record says 1x1"):
        SemSegTestMapper(min_size=0, max_size=100)(dict(record, height=1, width=1))
    no_label = {k: v for k, v in record.items() if k != "sem_seg_file_name"}
    with pytest.raises(DatasetError, match="sem_seg_file_name"):
        SemSegTrainMapper(min_sizes=(40,), max_size=100)(no_label, np.random.default_rng(0))


def test_missing_label_and_folder_errors(fresh_root, tmp_path: Path) -> None:
    root = fresh_root("mapillary", num_images=2)
    label = sorted((root / "mapillary_vistas/train/labels").iterdir())[0]
    label.unlink()
    with pytest.raises(MissingDataError, match=r"mv_sem_seg_train.*without a label.*" + label.stem):
        load_records("mv_sem_seg_train", root)
    stray = root / "mapillary_vistas/val/labels/orphan.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(stray)
    with pytest.raises(DatasetError, match="orphan.png"):
        load_records("mv_sem_seg_val", root)
    with pytest.raises(MissingDataError, match=r"idd_sem_seg_val.*IDD_Segmentation/leftImg8bit/val"):
        load_records("idd_sem_seg_val", tmp_path / "empty_root")


def test_unexpected_file_in_cityscapes_folder(fresh_root) -> None:
    root = fresh_root("cityscapes", num_images=2)
    odd = root / "cityscapes/leftImg8bit/val/frankfurt/frankfurt_000000_000019_gtFine_color.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(odd)
    with pytest.raises(DatasetError, match="unexpected.*gtFine_color.png"):
        load_records("cs-normal_sem_seg_val", root)


def test_malformed_nyu_split_file(fresh_root) -> None:
    root = fresh_root("nyu", num_images=1)
    (root / "nyudv2" / "test.txt").write_text("rgb/000001.png;masks/000001.png\n")
    with pytest.raises(DatasetError, match=r"test.txt:1"):
        load_records("nyu_sem_seg_val", root)
