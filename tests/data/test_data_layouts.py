"""Synthetic writer -> loader round trips, one per layout: counts, pairing, order, sizes, label values."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cat_seg.data import (
    DATASETS,
    MissingDataError,
    get_dataset,
    label_ids_to_train_ids,
    load_records,
    prepare_ade20k,
    read_label,
    write_synthetic,
)
from cat_seg.data.layouts import DEFAULT_NYU_SPLITS_DIR, scan_nyu
from cat_seg.data.prepare import main as prepare_main

# dataset family -> function(image path) -> expected label path (the layout's naming rule)
LABEL_RULES = {
    "acdc": lambda p: Path(
        str(p).replace("/rgb_anon/", "/gt/").replace("_rgb_anon.png", "_gt_labelTrainIds.png")
    ),
    "muses": lambda p: Path(
        str(p)
        .replace("/frame_camera/", "/gt_semantic/")
        .replace("_frame_camera.png", "_gt_labelTrainIds.png")
    ),
    "cityscapes": lambda p: Path(
        str(p).replace("/leftImg8bit/", "/gtFine/").replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
    ),
    "bdd": lambda p: Path(str(p).replace("/images/10k/", "/labels/sem_seg/masks/")).with_suffix(".png"),
    "mapillary": lambda p: Path(str(p).replace("/images/", "/labels/")).with_suffix(".png"),
    "ade20k": lambda p: Path(str(p).replace("/images/", "/annotations_detectron2/")).with_suffix(".png"),
    "idd": lambda p: Path(
        str(p).replace("/leftImg8bit/", "/gtFine/").replace("_leftImg8bit.png", "_gtFine_labellevel3Ids.png")
    ),
    "pascal_ctx59": lambda p: Path(str(p).replace("/images/", "/annotations_ctx59/")).with_suffix(".png"),
    "nyu": lambda p: Path(str(p).replace("/rgb/", "/masks/")),
    "coconut": lambda p: Path(
        str(p)
        .replace("/train2017/", "/panoptic_semseg_train2017/")
        .replace("/val2017/", "/panoptic_semseg_val2017/")
    ).with_suffix(".png"),
}

IMAGE_SUFFIX = {
    "bdd": ".jpg",
    "mapillary": ".jpg",
    "ade20k": ".jpg",
    "pascal_ctx59": ".jpg",
    "coconut": ".jpg",
}


@pytest.mark.parametrize("name", list(DATASETS))
def test_records_match_written_files(synthetic_root: Path, num_images: int, name: str) -> None:
    spec = get_dataset(name)
    records = load_records(name, synthetic_root)
    assert len(records) == num_images
    names = [r["file_name"] for r in records]
    assert names == sorted(names), "records must be sorted by file_name"
    for r in records:
        image, label = Path(r["file_name"]), Path(r["sem_seg_file_name"])
        assert image.is_file() and label.is_file()
        assert image.is_relative_to(synthetic_root)
        assert label == LABEL_RULES[spec.layout](image)
        assert image.suffix == IMAGE_SUFFIX.get(spec.layout, ".png")
        assert r["dataset"] == name
        with Image.open(image) as im:
            assert (r["height"], r["width"]) == (im.height, im.width)
            assert im.mode == "RGB"
        values = read_label(label)
        assert values.shape == (r["height"], r["width"])
        valid = (values < spec.num_classes) | (values == spec.ignore_label)
        assert valid.all() and values.min() >= 0
        assert len(np.unique(values[values != spec.ignore_label])) >= 1


@pytest.mark.parametrize("layout", ["acdc", "muses", "cityscapes"])
def test_cityscapes_family_label_ids_convert_to_train_ids(synthetic_root: Path, layout: str) -> None:
    name = {
        "acdc": "acdc-snow_sem_seg_val",
        "muses": "muses-fog-night_sem_seg_train",
        "cityscapes": "cs-normal_sem_seg_val",
    }[layout]
    for r in load_records(name, synthetic_root):
        label_ids = read_label(r["label_ids_file_name"])
        train_ids = read_label(r["sem_seg_file_name"])
        np.testing.assert_array_equal(label_ids_to_train_ids(label_ids), train_ids)
        assert (train_ids == 255).any(), "synthetic Cityscapes labels must contain ignored ids"


def test_mapillary_labels_are_palette_pngs(synthetic_root: Path) -> None:
    r = load_records("mv_sem_seg_val", synthetic_root)[0]
    with Image.open(r["sem_seg_file_name"]) as im:
        assert im.mode == "P"
    label = read_label(r["sem_seg_file_name"])
    assert label.max() <= 65 and (label == 65).any()


def test_acdc_reference_images_pair_with_ref_labels(fresh_root) -> None:
    root = fresh_root("acdc", num_images=2, conditions=["fog"], with_ref=True)
    records = load_records("acdc-fog_sem_seg_train", root)
    refs = [r for r in records if r["file_name"].endswith("_rgb_ref_anon.png")]
    assert len(records) == 3 and len(refs) == 1
    assert refs[0]["sem_seg_file_name"].endswith("GOPR0475_frame_000999_gt_ref_labelTrainIds.png")


def test_idd_accepts_jpg_images(fresh_root) -> None:
    root = fresh_root("idd", num_images=2)
    png = sorted((root / "IDD_Segmentation/leftImg8bit/val").rglob("*.png"))[0]
    Image.open(png).convert("RGB").save(png.with_suffix(".jpg"))
    png.unlink()
    records = load_records("idd_sem_seg_val", root)
    assert any(r["file_name"].endswith("_leftImg8bit.jpg") for r in records)
    jpg = next(r for r in records if r["file_name"].endswith(".jpg"))
    assert jpg["sem_seg_file_name"].endswith("_gtFine_labellevel3Ids.png")


def test_nyu_split_file_resolution(fresh_root, tmp_path: Path) -> None:
    root = fresh_root("nyu", num_images=2)
    train = load_records("nyu_sem_seg_train", root)
    lines = (root / "nyudv2" / "train.txt").read_text().split()
    assert [Path(r["file_name"]).name for r in train] == [ln.split(",")[0].split("/")[1] for ln in lines]
    assert all(r["depth_name"].endswith(Path(r["file_name"]).name) for r in train)
    # An explicit splits folder wins over the files in the root.
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text(lines[0] + "\n")
    assert len(scan_nyu(root, split="train", splits_dir=splits).pairs) == 1
    # Without split files in the root, the repository's misc/nyudv2_splits (795 / 654 lines) is used.
    assert DEFAULT_NYU_SPLITS_DIR.joinpath("train.txt").is_file()
    (root / "nyudv2" / "train.txt").unlink()
    scan = scan_nyu(root, split="train")
    assert scan.num_images == 795
    with pytest.raises(MissingDataError, match="listed file"):
        load_records("nyu_sem_seg_train", root)
    assert len(DEFAULT_NYU_SPLITS_DIR.joinpath("test.txt").read_text().split()) == 654


def test_coconut_without_json_lists_labels_and_objects365_entries(fresh_root) -> None:
    root = fresh_root("coconut", num_images=2)
    coco = root / "coco"
    with_json = load_records("coconutL_sem_seg_train", root)
    assert all("image_id" in r for r in with_json)
    (coco / "annotations" / "panoptic_train2017.json").unlink()
    without_json = load_records("coconutL_sem_seg_train", root)
    assert [r["file_name"] for r in without_json] == [r["file_name"] for r in with_json]
    # An Objects365 entry: image and label are named after object365_file_name.
    src = Path(with_json[0]["file_name"])
    (coco / "train2017" / "objects365_v1_00000001.jpg").write_bytes(src.read_bytes())
    (coco / "panoptic_semseg_train2017" / "objects365_v1_00000001.png").write_bytes(
        Path(with_json[0]["sem_seg_file_name"]).read_bytes()
    )
    ann = {
        "image_id": 5,
        "file_name": "x.png",
        "object365_file_name": "objects365_v1_00000001",
        "segments_info": [],
    }
    (coco / "annotations" / "panoptic_train2017.json").write_text(json.dumps({"annotations": [ann]}))
    (record,) = load_records("coconutL_sem_seg_train", root)
    assert record["file_name"].endswith("train2017/objects365_v1_00000001.jpg")
    assert record["sem_seg_file_name"].endswith("panoptic_semseg_train2017/objects365_v1_00000001.png")


def test_prepare_ade20k_reproduces_detectron2_annotations(fresh_root, capsys) -> None:  # noqa: ANN001
    root = fresh_root("ade20k", num_images=2)
    d2 = root / "ADEChallengeData2016" / "annotations_detectron2"
    expected = {p.relative_to(d2): read_label(p) for p in sorted(d2.rglob("*.png"))}
    for p in d2.rglob("*.png"):
        p.unlink()
    assert prepare_ade20k(root) == (len(expected), 0) == (4, 0)
    for rel, label in expected.items():
        np.testing.assert_array_equal(read_label(d2 / rel), label)
    assert prepare_ade20k(root) == (0, 4)  # existing files are kept (and counted as such)
    assert prepare_main(["ade20k", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "wrote 0 label files under" in out and "kept 4 existing ones (--overwrite rewrites them)" in out


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_writers_are_deterministic(tmp_path: Path) -> None:
    a = write_synthetic("bdd", tmp_path / "a", 2, seed=3)
    b = write_synthetic("bdd", tmp_path / "b", 2, seed=3)
    c = write_synthetic("bdd", tmp_path / "c", 2, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    sizes = {Image.open(p).size for p in a if p.suffix == ".jpg"}
    assert len(sizes) > 1 and all(40 <= s <= 80 for size in sizes for s in size)
