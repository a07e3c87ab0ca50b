"""train_net.py --eval-only with TEST.AUG.ENABLED (what eval_lora.sh runs): the plain evaluation, then the
test-time-augmented one (``<dataset>_TTA``, ``inference_TTA/``), as the original's ``test_with_TTA``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_testlib import TINY_CONFIG, VAL, WRAPPER_OPTS, make_root, single_thread, train_net

# INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST of the tiny configs: one view at this size is the mapper's image.
ONE_VIEW = ("TEST.AUG.MIN_SIZES", "(48,)", "TEST.AUG.MAX_SIZE", "96", "TEST.AUG.FLIP", "False")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_root(tmp_path_factory.mktemp("tta_env"))


def _eval(env: tuple[Path, Path], out: Path, *opts: str) -> int:
    root, base = env
    return train_net().main([
        "--config-file", str(TINY_CONFIG), "--data-root", str(root), "--no-progress", "--eval-only",
        "OUTPUT_DIR", str(out), *WRAPPER_OPTS, "MODEL.WEIGHTS", str(base), "MODEL.LORA.ENABLED", "False",
        "TEST.AUG.ENABLED", "True", *opts,
    ])  # fmt: skip


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("sliding", ["True", "False"], ids=["sliding-window", "whole-image"])
def test_one_view_at_the_test_size_reproduces_the_plain_evaluation(
    env: tuple[Path, Path], tmp_path: Path, sliding: str
) -> None:
    out = tmp_path / "eval"
    assert _eval(env, out, *ONE_VIEW, "TEST.SLIDING_WINDOW", sliding) == 0
    plain = _metrics(out / "inference" / VAL / "metrics.json")
    augmented = _metrics(out / "inference_TTA" / VAL / "metrics.json")
    assert augmented["tta"] == {"min_sizes": [48], "max_size": 96, "flip": False, "views": 1}
    # the same confusion matrix: every metric equal (json.dumps: NaN == NaN)
    assert json.dumps(augmented["sem_seg"], sort_keys=True) == json.dumps(plain["sem_seg"], sort_keys=True)
    assert "tta" not in plain
    log = (out / "log.txt").read_text()
    assert f"copypaste: Dataset: {VAL}_TTA" in log and f"copypaste: Dataset: {VAL}\n" in log
    evaluation = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(evaluation[-1]["results"]) == {VAL, f"{VAL}_TTA"}


def test_scales_and_flips_are_evaluated_and_printed(
    env: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    assert _eval(env, out, "TEST.AUG.MIN_SIZES", "(32, 64)") == 0
    augmented = _metrics(out / "inference_TTA" / VAL / "metrics.json")
    assert augmented["tta"] == {"min_sizes": [32, 64], "max_size": 4000, "flip": True, "views": 4}
    assert augmented["sem_seg"]["num_images"] == 4 and 0 <= augmented["value"] <= 100
    table = capsys.readouterr().out
    assert f"{VAL}_TTA" in table and VAL in table


def test_bad_settings_are_refused_in_one_line_naming_the_key(
    env: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    assert _eval(env, out, "TEST.AUG.MIN_SIZES", "()") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train_net.py: error: ") and "TEST.AUG.MIN_SIZES" in err
    assert not out.exists()
