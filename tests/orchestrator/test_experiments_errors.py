"""Every problem that experiments.py can find before the first image: found, named, no traceback."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from engine_testlib import single_thread
from helpers import write_tiny_hf_clip
from safetensors.torch import load_file, save_file
from semla_world import World, experiments_main

pytestmark = pytest.mark.slow


class InferenceRan(Exception):
    """Raised by the patched model: the run reached inference."""


@pytest.fixture
def no_inference(monkeypatch) -> None:  # noqa: ANN001
    from cat_seg.modeling.cat_seg import CATSeg

    def forbidden(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise InferenceRan("a forward pass ran before the problem was reported")

    monkeypatch.setattr(CATSeg, "forward", forbidden)


def _copy_library(world: World, folder: Path) -> Path:
    return Path(shutil.copytree(world.library, folder / "loradb"))


def _set(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def _unknown_target(world: World, tmp: Path) -> list[str]:
    path = tmp / "targets.yaml"
    path.write_text("- acdc-rain\n- acdc-rian\n")
    return _set(world.args(tmp / "out", "semla"), "--target_domains", str(path))


def _missing_dataset_folder(world: World, tmp: Path) -> list[str]:
    root = Path(shutil.copytree(world.root, tmp / "data"))
    shutil.rmtree(root / "muses" / "frame_camera" / "val")
    return _set(world.args(tmp / "out", "zeroshot"), "--datasets_root", str(root))


def _missing_adapter(world: World, tmp: Path) -> list[str]:
    library = _copy_library(world, tmp)
    shutil.rmtree(library / "a150")
    return _set(world.args(tmp / "out", "uniform"), "--lora_library_path", str(library))


def _nan_adapter(world: World, tmp: Path) -> list[str]:
    library = _copy_library(world, tmp)
    path = library / "muses-fog-day" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return _set(world.args(tmp / "out", "uniform"), "--lora_library_path", str(library))


def _statistics_of_another_embedder(world: World, tmp: Path) -> list[str]:
    other = write_tiny_hf_clip(tmp / "other_clip", seed=1)  # same architecture, other weights
    return _set(world.args(tmp / "out", "semla"), "--embedding_model", str(other))


def _semla_config_typo(world: World, tmp: Path) -> list[str]:
    path = tmp / "semla.yaml"
    path.write_text("distance_measure_name: euclidean\ntemprature: 0.05\ntop_k: 5\n")
    return world.args(tmp / "out", "semla", extra=("--semla_config", str(path)))


def _semla_configs_without_semla(world: World, tmp: Path) -> list[str]:
    for name in ("a", "b"):
        (tmp / f"{name}.yaml").write_text("top_k: 2\n")
    return world.args(
        tmp / "out", "uniform", extra=("--semla_config", str(tmp / "a.yaml"), str(tmp / "b.yaml"))
    )


def _semla_configs_of_one_stem(world: World, tmp: Path) -> list[str]:
    for folder in ("x", "y"):
        (tmp / folder).mkdir()
        (tmp / folder / "top2.yaml").write_text("top_k: 2\n")
    extra = ("--semla_config", str(tmp / "x" / "top2.yaml"), str(tmp / "y" / "top2.yaml"))
    return world.args(tmp / "out", "semla", extra=extra)


def _linear_over_unequal_ranks(world: World, tmp: Path) -> list[str]:
    import json

    library = _copy_library(world, tmp)
    folder = library / "a150"  # made a rank-2 adapter: its first two rank components
    tensors = load_file(folder / "adapter_model.safetensors")
    cut = {k: (v[:2].clone() if "lora_A" in k else v[:, :2].clone()) for k, v in tensors.items()}
    save_file(cut, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 2, "lora_alpha": 2}))
    (tmp / "linear.yaml").write_text("combination_type: linear\n")
    args = _set(world.args(tmp / "out", "uniform"), "--lora_library_path", str(library))
    return [*args, "--semla_config", str(tmp / "linear.yaml")]


def _missing_checkpoint(world: World, tmp: Path) -> list[str]:
    return _set(world.args(tmp / "out", "zeroshot"), "--model_weights", str(tmp / "model_final.pth"))


CASES: dict[str, tuple[Callable[[World, Path], list[str]], str]] = {
    "unknown domain": (_unknown_target, r"unknown domain 'acdc-rian'; did you mean acdc-rain"),
    "missing dataset folder": (
        _missing_dataset_folder,
        r"target muses-fog-day: muses-fog-day_sem_seg_val is not usable",
    ),
    "missing adapter": (
        _missing_adapter,
        r"adapter 'a150' \(a source domain\) not found: .*a150/adapter_config.json",
    ),
    "NaN adapter": (_nan_adapter, r"adapter 'muses-fog-day', module .*NaN or Inf"),
    "statistics of another embedder": (
        _statistics_of_another_embedder,
        r"the statistics of acdc-rain, muses-fog-day, a150, acdc-fog \(in .*loradb\) were made by another embedder",
    ),
    "semla_config typo": (_semla_config_typo, r"unknown key 'temprature'; did you mean 'temperature'\?"),
    "missing checkpoint": (_missing_checkpoint, r"CAT-Seg checkpoint .*model_final.pth not found"),
    "semla configs without semla": (
        _semla_configs_without_semla,
        r"several --semla_config files make semla columns; add semla to --experiment",
    ),
    "linear over unequal ranks": (
        _linear_over_unequal_ranks,
        r"uniform: combination_type linear: All adapters must have the same r value",
    ),
    "semla configs of one stem": (
        _semla_configs_of_one_stem,
        r"two files named 'top2'; their columns would clash",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_before_inference(world: World, tmp_path: Path, case: str, capsys, no_inference) -> None:  # noqa: ANN001
    make_args, message = CASES[case]
    args = make_args(world, tmp_path)
    with single_thread():
        status = experiments_main()(args)
    err = capsys.readouterr().err
    assert status == 1, err
    errors = [line for line in err.splitlines() if line.startswith("experiments.py: error: ")]
    assert len(errors) == 1, err  # one message (the lines before it are the console log)
    assert re.search(message, err[err.index(errors[0]) :]), err
    assert "Traceback" not in err
    out = tmp_path / "out"
    assert not (out / "metrics.json").exists() and not (out / "progress").exists()


def test_every_problem_is_reported_at_once(world: World, tmp_path: Path, capsys, no_inference) -> None:  # noqa: ANN001
    args = _missing_checkpoint(world, tmp_path)
    typo = tmp_path / "semla.yaml"
    typo.write_text("top_k: 0\n")
    args = [*args, "--semla_config", str(typo)]
    assert experiments_main()(args) == 1
    err = capsys.readouterr().err
    assert "2 problems:" in err and "top_k must be an integer >= 1" in err and "not found" in err


def test_debug_shows_the_traceback(world: World, tmp_path: Path) -> None:
    from domain_orchestrator.orchestrator import ExperimentError

    with pytest.raises(ExperimentError, match="not found"):
        experiments_main()([*_missing_checkpoint(world, tmp_path), "--debug"])
