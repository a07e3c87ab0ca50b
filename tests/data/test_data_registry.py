"""The dataset registry: names, facts per domain, lookup errors, the root from the environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cat_seg.data import (
    DATASETS,
    DOMAINS,
    UnknownDatasetError,
    build_registry,
    default_root,
    get_dataset,
    list_datasets,
    list_domains,
)

EXPECTED_DOMAINS = (
    [f"acdc-{c}" for c in ("fog", "night", "rain", "snow")]
    + [f"muses-{w}-{t}" for w in ("clear", "fog", "rain", "snow") for t in ("day", "night")]
    + ["cs-normal", "bdd", "mv", "a150", "idd", "pc59", "nyu", "coconutL"]
)


def test_every_reference_name_is_registered() -> None:
    assert sorted(DOMAINS) == sorted(EXPECTED_DOMAINS) and len(DOMAINS) == 20
    expected = {f"{d}_sem_seg_{s}" for d in EXPECTED_DOMAINS for s in ("train", "val")}
    assert set(list_datasets()) == expected == set(DATASETS)
    assert list_domains() == list(DOMAINS)
    assert list_datasets("mv") == ["mv_sem_seg_train", "mv_sem_seg_val"]


def test_registry_is_pure_and_read_only() -> None:
    assert build_registry() == dict(DATASETS)
    with pytest.raises(TypeError):
        DATASETS["x"] = DATASETS["bdd_sem_seg_val"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "layout", "num_classes", "ignore", "convention", "evaluator", "class_json"),
    [
        ("acdc-night_sem_seg_val", "acdc", 19, 255, "cityscapes", "acdc_sem_seg", "datasets/cs19.json"),
        (
            "muses-snow-day_sem_seg_train",
            "muses",
            19,
            255,
            "cityscapes",
            "muses_sem_seg",
            "datasets/cs19.json",
        ),
        (
            "cs-normal_sem_seg_val",
            "cityscapes",
            19,
            255,
            "cityscapes",
            "resized_cityscapes_sem_seg",
            "datasets/cs19.json",
        ),
        ("bdd_sem_seg_val", "bdd", 19, 255, "detectron2", "sem_seg", "datasets/cs19.json"),
        ("mv_sem_seg_val", "mapillary", 65, 65, "detectron2", "sem_seg", "datasets/mv65.json"),
        ("a150_sem_seg_val", "ade20k", 150, 255, "detectron2", "sem_seg", "datasets/ade150.json"),
        ("idd_sem_seg_val", "idd", 26, 255, "detectron2", "sem_seg", "datasets/idd30.json"),
        ("pc59_sem_seg_val", "pascal_ctx59", 59, 255, "detectron2", "sem_seg", "datasets/pc59.json"),
        ("nyu_sem_seg_val", "nyu", 40, 255, "detectron2", "sem_seg", "datasets/nyu40.json"),
        ("coconutL_sem_seg_val", "coconut", 133, 255, "detectron2", "sem_seg", "datasets/coconut.json"),
    ],
)
def test_spec_facts(name, layout, num_classes, ignore, convention, evaluator, class_json) -> None:
    spec = get_dataset(name)
    assert (spec.layout, spec.num_classes, spec.ignore_label) == (layout, num_classes, ignore)
    assert (spec.metric_convention, spec.evaluator_type, spec.class_json) == (
        convention,
        evaluator,
        class_json,
    )
    assert spec.resize_to == ((1024, 512) if layout == "cityscapes" else None)
    assert callable(spec.loader) and callable(spec.scanner)
    assert spec.class_json_path.parent.parent.name == "catseg"


def test_class_json_lengths_match_when_present() -> None:
    checked = 0
    for spec in DATASETS.values():
        if spec.class_json_path.is_file():
            assert len(json.loads(spec.class_json_path.read_text())) == spec.num_classes, spec.class_json
            assert len(spec.class_names()) == spec.num_classes
            checked += 1
    if not checked:
        pytest.skip("catseg/datasets/*.json not present in this checkout")


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(KeyError, match="acdc-rain_sem_seg_val"):
        get_dataset("acdc-rain_sem_seg_vall")
    with pytest.raises(UnknownDatasetError, match="coconutL"):
        list_datasets("coconut")


def test_default_root_reads_the_environment(tmp_path: Path) -> None:
    assert default_root({"DETECTRON2_DATASETS": str(tmp_path)}) == tmp_path
    assert default_root({"DETECTRON2_DATASETS": str(tmp_path) + "/"}) == tmp_path  # no trailing slash needed
    with pytest.raises(ValueError, match="DETECTRON2_DATASETS"):
        default_root({})
