"""Domain specs: a dataset of your own, with its own classes, accepted where a built-in domain is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cat_seg.config import load_config
from cat_seg.data import load_records
from cat_seg.data.domain_spec import DomainSpecError, load_domain_spec
from cat_seg.data.registry import (
    DOMAINS,
    UnknownDatasetError,
    get_dataset,
    list_domains,
    register_domain_spec_file,
    registered_domain_specs,
)
from cat_seg.data.synthetic import write_own_domain
from cat_seg.data.validate import main as validate_main
from cat_seg.engine.evaluate import check_vocabulary


@pytest.fixture
def own(tmp_path: Path) -> Path:
    """The spec of ``floods`` (classes water, road, sky; 6 train + 3 val images) in a fresh folder."""
    return write_own_domain(tmp_path / "own", num_train=6, num_val=3, seed=3)


def _spec(folder: Path, text: str, classes: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if classes is not None:
        (folder / "classes.json").write_text(json.dumps(classes))
    path = folder / "spec.yaml"
    path.write_text(text)
    return path


def test_a_spec_registers_its_datasets_with_its_own_classes(own: Path) -> None:
    spec = register_domain_spec_file(own)
    assert spec.name == "floods" and spec.class_names == ("water", "road", "sky")
    assert list_domains() == [*DOMAINS, "floods"]  # the built-in ones first, unchanged
    val = get_dataset("floods_sem_seg_val")
    assert (val.num_classes, val.ignore_label, val.metric_convention) == (3, 255, "detectron2")
    assert val.class_names() == ["water", "road", "sky"]
    records = load_records("floods_sem_seg_val", Path("/nonexistent-root"))  # the spec says where
    assert [Path(r["file_name"]).name for r in records] == [f"floods_{i:04d}.jpg" for i in range(3)]
    assert all(Path(r["sem_seg_file_name"]).parent.name == "labels" for r in records)
    assert len(load_records("floods_sem_seg_train", Path("/"))) == 6
    check_vocabulary(["water", "road", "sky"], "floods_sem_seg_val")
    with pytest.raises(ValueError, match="3 classes of .*classes.json"):
        check_vocabulary(["road", "sky"], "floods_sem_seg_val")
    register_domain_spec_file(own)  # the same spec again: nothing changes
    assert len(registered_domain_specs()) == 1


def test_every_problem_of_a_spec_is_named_in_one_message(tmp_path: Path) -> None:
    path = _spec(
        tmp_path,
        "name: bdd\nclases: c.json\nignore_label: 1\nmetric: coco\ntrain: {images: a, lables: b}\n",
    )
    with pytest.raises(DomainSpecError) as e:
        load_domain_spec(path)
    message = str(e.value)
    assert message.startswith(f"domain spec {path}: ")
    for part in (
        "unknown key(s) clases",
        "'bdd' is a built-in domain",
        "classes is required",
        "metric must be detectron2 or cityscapes",
        "train: unknown key(s) lables",
        "train.labels must be a path",
    ):
        assert part in message, part


@pytest.mark.parametrize(
    ("text", "classes", "expected"),
    [
        ("name: x\nclasses: missing.json\nval: {images: i, labels: l}\n", None, "missing.json not found"),
        ("name: x\nclasses: classes.json\nval: {images: i, labels: l}\n", ["a", "a"], "repeats a"),
        ("name: x\nclasses: classes.json\nignore_label: 1\nval: {images: i, labels: l}\n", ["a", "b"],
         "ignore_label 1 is the id of class 'b'"),
        ("name: x\nclasses: classes.json\n", ["a"], "no split"),
        ("name: x_sem_seg_y\nclasses: classes.json\nval: {images: i, labels: l}\n", ["a"], "name must be"),
        ("name: x\nclasses: classes.json\nconfig: nope.yaml\nval: {images: i, labels: l}\n", ["a"],
         "base config nope.yaml not found"),
        ("- just\n- a list\n", None, "expected a YAML mapping"),
    ],
)  # fmt: skip
def test_bad_specs_are_refused_naming_the_problem(tmp_path: Path, text: str, classes, expected: str) -> None:  # noqa: ANN001
    with pytest.raises(DomainSpecError, match=expected):
        load_domain_spec(_spec(tmp_path, text, classes))


def test_two_different_specs_of_one_name_clash(own: Path, tmp_path: Path) -> None:
    register_domain_spec_file(own)
    other = write_own_domain(tmp_path / "elsewhere", num_train=1, num_val=1)
    with pytest.raises(DomainSpecError, match="defined by two different specs"):
        register_domain_spec_file(other)


def test_a_missing_split_and_an_unknown_dataset_say_what_to_do(tmp_path: Path) -> None:
    path = _spec(tmp_path, "name: only-val\nclasses: classes.json\nval: {images: i, labels: l}\n", ["a"])
    register_domain_spec_file(path)
    with pytest.raises(UnknownDatasetError, match="has no 'train' split"):
        get_dataset("only-val_sem_seg_train")
    with pytest.raises(UnknownDatasetError, match="DATASETS.SPECS"):
        get_dataset("floods_sem_seg_train")


def test_globs_nested_folders_and_a_shared_folder(tmp_path: Path) -> None:
    """Images found by a glob or recursively; labels beside the images are not taken for images."""
    data = tmp_path / "data"
    for i, sub in enumerate(["a", "a", "b"]):
        (data / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(data / sub / f"x{i}_rgb.png")
        Image.fromarray(np.ones((8, 10), np.uint8)).save(data / sub / f"x{i}_gt.png")
    path = _spec(
        tmp_path,
        "name: shared\nclasses: classes.json\n"
        "train: {images: data, labels: data, image_suffix: _rgb.png, label_suffix: _gt.png}\n"
        "val: {images: 'data/b/*_rgb.png', labels: data/b, image_suffix: _rgb.png, label_suffix: _gt.png}\n",
        ["a", "b"],
    )
    register_domain_spec_file(path)
    train = load_records("shared_sem_seg_train", tmp_path)
    assert [Path(r["sem_seg_file_name"]).relative_to(data).as_posix() for r in train] == [
        "a/x0_gt.png", "a/x1_gt.png", "b/x2_gt.png"
    ]  # fmt: skip
    assert [Path(r["file_name"]).name for r in load_records("shared_sem_seg_val", tmp_path)] == ["x2_rgb.png"]


def test_a_spec_is_a_config_file_and_datasets_specs_registers(own: Path, tmp_path: Path) -> None:
    cfg = load_config(own, ["SOLVER.MAX_ITER", "3"])
    head = cfg.MODEL.SEM_SEG_HEAD
    assert cfg.DATASETS.TRAIN == ("floods_sem_seg_train",) and cfg.DATASETS.TEST == ("floods_sem_seg_val",)
    assert Path(head.TEST_CLASS_JSON) == Path(head.TRAIN_CLASS_JSON) == own.parent / "floods" / "classes.json"
    assert (head.NUM_CLASSES, head.IGNORE_VALUE, cfg.SOLVER.MAX_ITER) == (3, 255, 3)
    assert cfg.DATASETS.SPECS == [str(own)]
    assert cfg.MODEL.SEM_SEG_HEAD.CLIP_PRETRAINED == "ViT-L/14@336px"  # catseg/configs/own_domain.yaml
    from cat_seg.data.registry import unregister_domain_specs

    unregister_domain_specs()
    cfg = load_config("catseg/configs/tiny/tiny.yaml", ["DATASETS.SPECS", f"['{own}']"])
    assert get_dataset("floods_sem_seg_val").num_classes == 3 and cfg.DATASETS.SPECS == [str(own)]


def test_validate_checks_a_spec_and_its_label_ids(own: Path, capsys) -> None:  # noqa: ANN001
    assert validate_main(["--domain_spec", str(own)]) == 0
    out = capsys.readouterr().out
    assert "== floods ==" in out and "2 of 2 dataset splits usable" in out
    label = own.parent / "floods" / "val" / "labels" / "floods_0001.png"
    array = np.array(Image.open(label))
    array[0, 0] = 7
    Image.fromarray(array).save(label)
    assert validate_main(["--domain_spec", str(own)]) == 1
    assert f"{label}: label ids out of range: 7 (expected 0..2 or ignore 255)" in capsys.readouterr().out
    assert validate_main(["--domain_spec", str(own.parent / "nope.yaml")]) == 1
    assert "domain spec not found: " in capsys.readouterr().err
