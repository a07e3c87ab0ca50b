"""experiments.py --tta on the small world: SemLA's weights come from the original image (the same with and
without --tta), one view at the test size reproduces the plain run, bad settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_testlib import single_thread
from semla_world import World, experiments_main, read_json

pytestmark = pytest.mark.slow
TARGET = "acdc-rain"
# the experiments' configs: the tiny model's INPUT.MIN_SIZE_TEST 48 / MAX_SIZE_TEST 96, sliding window
ONE_VIEW = ("TEST.AUG.MIN_SIZES", "(48,)", "TEST.AUG.MAX_SIZE", "96", "TEST.AUG.FLIP", "False")


def _run(world: World, folder: Path, *extra: str) -> int:
    targets = folder.parent / f"{folder.name}_targets.yaml"
    targets.write_text(f"- {TARGET}\n")
    args = world.args(folder, "zeroshot", "semla", extra=extra)
    args[args.index("--target_domains") + 1] = str(targets)
    with single_thread():
        return experiments_main()(args)


@pytest.fixture(scope="module")
def plain(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "run"
    assert _run(world, out) == 0
    return out


def test_tta_keeps_the_semla_weights_and_one_view_is_the_plain_run(
    world: World, plain: Path, tmp_path: Path
) -> None:
    one = tmp_path / "one"
    assert _run(world, one, "--tta", *ONE_VIEW) == 0
    assert read_json(one / "semla" / "weights.json") == read_json(plain / "semla" / "weights.json")
    # the same single view through the TTA path: the same confusion matrices, every metric equal
    assert json.dumps(read_json(one / "metrics.json"), sort_keys=True) == json.dumps(
        read_json(plain / "metrics.json"), sort_keys=True
    )
    assert read_json(one / "run_config.json")["opts"][:2] == ["TEST.AUG.ENABLED", "True"]


def test_tta_with_scales_and_flips_runs_end_to_end(world: World, plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "tta"
    assert _run(world, out, "--tta", "TEST.AUG.MIN_SIZES", "(32, 64)") == 0
    weights = read_json(out / "semla" / "weights.json")
    assert weights == read_json(plain / "semla" / "weights.json")  # retrieval from the original image
    metrics = read_json(out / "metrics.json")[TARGET]
    for experiment in ("zeroshot", "semla"):
        assert metrics[experiment]["num_images"] == 3 and 0 <= metrics[experiment]["IoU"] <= 100
    assert metrics != read_json(plain / "metrics.json")[TARGET]  # four views: other probabilities


def test_bad_tta_settings_are_refused_naming_the_key(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bad"
    assert _run(world, out, "--tta", "TEST.AUG.MIN_SIZES", "(0,)") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("experiments.py: error:") and "TEST.AUG.MIN_SIZES" in err[0]
    assert not (out / "metrics.json").exists()
