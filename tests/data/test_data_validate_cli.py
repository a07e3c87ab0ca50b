"""The ``validate`` and ``synthetic`` command lines, run through ``main([...])``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cat_seg.data import load_records, write_synthetic
from cat_seg.data import synthetic as synthetic_cli
from cat_seg.data import validate as validate_cli


def test_synthetic_cli_writes_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ds"
    argv = [
        "--layout",
        "acdc",
        "--root",
        str(root),
        "--num-images",
        "2",
        "--seed",
        "1",
        "--conditions",
        "rain",
    ]
    assert synthetic_cli.main(argv) == 0
    assert "acdc: wrote" in capsys.readouterr().out
    assert len(load_records("acdc-rain_sem_seg_val", root)) == 2
    assert not (root / "acdc" / "rgb_anon" / "fog").exists()
    assert synthetic_cli.main(["--layout", "all", "--root", str(root), "--num-images", "1"]) == 0
    assert len(load_records("coconutL_sem_seg_train", root)) == 1
    assert synthetic_cli.main(["--layout", "muses", "--root", str(root), "--conditions", "hail"]) == 2


def test_validate_clean_root_exits_zero(synthetic_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_cli.main(["--root", str(synthetic_root)]) == 0
    out = capsys.readouterr().out
    assert "40 of 40 dataset splits usable" in out
    assert "== muses-snow-night ==" in out and "PROBLEM" not in out


def test_validate_reports_broken_domains(fresh_root, capsys: pytest.CaptureFixture[str]) -> None:
    root = fresh_root("bdd")
    write_synthetic("acdc", root, 2, seed=0, conditions=["rain", "fog"])
    # bdd val: remove one label; acdc-fog train: delete the label folder
    label = sorted((root / "bdd100k/labels/sem_seg/masks/val").iterdir())[0]
    label.unlink()
    shutil.rmtree(root / "acdc/gt/fog/train")
    code = validate_cli.main(["--root", str(root), "--domains", "bdd", "acdc-fog", "acdc-rain"])
    out = capsys.readouterr().out
    assert code == 1
    assert "image(s) without a label" in out and label.with_suffix(".jpg").name in out
    assert "MISSING acdc/gt/fog/train/" in out
    assert "expected folder" in out
    assert validate_cli.main(["--root", str(root), "--domains", "acdc-rain"]) == 0
    assert validate_cli.main(["--root", str(root), "--domains", "acdc-rain", "--splits", "val"]) == 0
    # a whole domain absent
    assert validate_cli.main(["--root", str(root), "--domains", "nyu"]) == 1
    assert "nyudv2" in capsys.readouterr().out


def test_validate_reports_size_mismatch(fresh_root, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    root = fresh_root("pascal_ctx59", num_images=2)
    label = sorted((root / "pascal_ctx_d2/annotations_ctx59/training").iterdir())[0]
    Image.open(label).resize((13, 17)).save(label)
    assert validate_cli.main(["--root", str(root), "--domains", "pc59", "--splits", "train"]) == 1
    assert "image/label mismatch" in capsys.readouterr().out


def test_validate_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert validate_cli.main(["--root", str(tmp_path), "--domains", "acdc-rian"]) == 2
    assert "acdc-rain" in capsys.readouterr().err
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert validate_cli.main([]) == 2
    assert "DETECTRON2_DATASETS" in capsys.readouterr().err
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert validate_cli.main(["--domains", "bdd"]) == 1  # root from the environment, nothing there
