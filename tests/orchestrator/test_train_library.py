"""train_library.py: every missing adapter and prototype of a list, locally (submitit) or on Slurm.

End to end on the tiny preset with submitit's real local executor: a first build trains three ACDC
adapters, two at a time, and fails the fourth domain alone (its dataset is missing); after that dataset
is written and one finished adapter is deleted (what a kill between its last checkpoint and the adapter's
write leaves), a second build trains only those two, the deleted one from its checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from helpers import write_tiny_hf_clip  # noqa: E402

from domain_orchestrator.executors import ExecutorError, slurm_minutes  # noqa: E402
from domain_orchestrator.train_library import main  # noqa: E402

TINY_CONFIG = REPO_ROOT / "catseg" / "configs" / "tiny" / "tiny.yaml"


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("90", 90), ("90:30", 91), ("2:00:00", 120), ("1-0", 1440), ("1-2:30", 1590), ("0-0:0:1", 1)],
)
def test_slurm_time_is_read_as_slurm_reads_it(text: str, minutes: int) -> None:
    assert slurm_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "1:2:3:4", "abc", "0", "-5", "1-2:3:4:5"])
def test_bad_slurm_time_is_refused(text: str) -> None:
    with pytest.raises(ExecutorError, match="--slurm_time"):
        slurm_minutes(text)


def _domains(path: Path, names: list[str]) -> Path:
    path.write_text("".join(f"- {n}\n" for n in names), encoding="utf-8")
    return path


def test_slurm_dry_run_prints_the_sbatch_script_of_the_options(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    library = tmp_path / "loradb"
    (library / "acdc-fog").mkdir(parents=True)  # a finished adapter: not in the array
    (library / "acdc-fog" / "adapter_config.json").write_text("{}")
    (library / "acdc-fog" / "adapter_model.safetensors").write_bytes(b"")
    argv = [
        "--source_domains", str(_domains(tmp_path / "d.yaml", ["acdc-rain", "acdc-fog", "acdc-snow", "mv"])),
        "--lora_library_path", str(library), "--output_dir", str(tmp_path / "runs"),
        "--model_weights", "models/model_final.pth", "--embedding_model", "/models/clip",
        "--executor", "slurm", "--slurm_partition", "gpu-a100", "--slurm_time", "8:00:00",
        "--slurm_gpus_per_job", "2", "--slurm_cpus_per_gpu", "6", "--slurm_array_parallelism", "2",
        "--slurm_account", "proj42", "--slurm_qos", "high", "--dry_run",
        "SOLVER.MAX_ITER", "100",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    for line in [
        "#SBATCH --partition=gpu-a100",
        "#SBATCH --time=480",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --array=0-2%2",  # three adapters to train, two at once
        "#SBATCH --account=proj42",
        "#SBATCH --qos=high",
        "#SBATCH --job-name=semla-library",
    ]:
        assert line in out, line
    assert "acdc-fog                 done, skipped" in out
    # each adapter's command is run_lora.sh's, with its config from the domain table, NUM_GPUS 2
    assert (
        "run_lora.sh "
        + str(REPO_ROOT / "catseg" / "configs" / "acdc" / "rain" / "lora-rain-acdc.yaml")
        + " 2 "
        in out
    )
    assert "SOLVER.MAX_ITER 100 MODEL.LORA.NAME acdc-rain" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_refusals_are_one_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    common = [
        "--lora_library_path", str(tmp_path / "lib"), "--output_dir", str(tmp_path / "runs"),
        "--model_weights", "w.pth", "--embedding_model", "clip", "--dry_run",
    ]  # fmt: skip
    cases = [
        (["--source_domains", str(_domains(tmp_path / "a.yaml", ["acdc-rain"])), "MODEL.LORA.NAME", "x"],
         "MODEL.LORA.NAME is set per domain"),
        (["--source_domains", str(_domains(tmp_path / "b.yaml", ["acdc-rian"]))], "unknown domain 'acdc-rian'"),
        (["--source_domains", str(_domains(tmp_path / "c.yaml", ["acdc-rain"])), "--gpus", "0,x"], "--gpus"),
        (["--source_domains", str(_domains(tmp_path / "d.yaml", ["acdc-rain"])), "SOLVER.MAX_ITER"], "KEY VALUE"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main(common + extra) == 1
        err = capsys.readouterr().err
        assert err.startswith("train_library.py: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_local_build_trains_what_is_missing_and_resumes(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from cat_seg.checkpoint import save_checkpoint
    from cat_seg.config import load_config
    from cat_seg.data.synthetic import write_synthetic
    from cat_seg.modeling import build_model

    root = tmp_path / "data"
    write_synthetic("acdc", root, 4, seed=0, conditions=["rain", "fog", "snow"])
    base = tmp_path / "base.pth"
    torch.manual_seed(0)
    save_checkpoint(build_model(load_config(TINY_CONFIG), "cpu"), base)
    clip = write_tiny_hf_clip(tmp_path / "clip")
    library, runs = tmp_path / "loradb", tmp_path / "runs"
    names = ["acdc-rain", "acdc-fog", "acdc-snow", "acdc-night"]
    argv = [
        "--source_domains", str(_domains(tmp_path / "domains.yaml", names)),
        "--lora_library_path", str(library), "--output_dir", str(runs),
        "--model_weights", str(base), "--embedding_model", str(clip), "--config", str(TINY_CONFIG),
        "--datasets_root", str(root), "--device", "cpu", "--executor", "local", "--jobs", "2",
        "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "3", "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip

    assert main(argv) == 1  # acdc-night has no data
    out = capsys.readouterr()
    table = out.out[out.out.index("domain  ") :]
    for name in names[:3]:
        row = next(line for line in table.splitlines() if line.startswith(name))
        assert row.split()[1] == "3" and row.rstrip().endswith("trained"), row
        assert (library / name / "adapter_model.safetensors").is_file()
        assert (library / name / f"{name}_statistics.npz").is_file()
    night = next(line for line in table.splitlines() if line.startswith("acdc-night"))
    assert "FAILED: " in night and str(runs / "acdc-night" / "train_library.log") in night
    assert "acdc-night" in night.split("FAILED: ")[1]  # the trainer's own one-line reason names it
    assert not (library / "acdc-night").exists()
    assert "adapters missing for acdc-night; prototypes missing for acdc-night" in out.err

    write_synthetic("acdc", root, 4, seed=0, conditions=["night"])
    rain_file = library / "acdc-rain" / "adapter_model.safetensors"
    rain_before = (rain_file.stat().st_mtime_ns, rain_file.read_bytes())
    fog_before = (library / "acdc-fog" / "adapter_model.safetensors").read_bytes()
    for f in (library / "acdc-fog").iterdir():
        f.unlink()
    (library / "acdc-fog").rmdir()

    assert main(argv) == 0
    table = capsys.readouterr().out
    status = {line.split()[0]: line for line in table.splitlines() if line.startswith("acdc-")}
    assert status["acdc-rain"].rstrip().endswith("done before")
    assert status["acdc-snow"].rstrip().endswith("done before")
    assert status["acdc-fog"].rstrip().endswith("trained (resumed)")
    assert status["acdc-night"].rstrip().endswith("trained")
    assert (rain_file.stat().st_mtime_ns, rain_file.read_bytes()) == rain_before  # not retrained
    # resumed from its final checkpoint: the same adapter as the first time
    assert (library / "acdc-fog" / "adapter_model.safetensors").read_bytes() == fog_before
    for name in names:
        assert (library / name / f"{name}_statistics.npz").is_file()
    assert "library complete: 4 adapters" in table
    assert os.path.isfile(runs / "acdc-night" / "train_library.log")


@pytest.mark.slow
def test_a_killed_build_run_again_finishes_only_what_is_missing(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """The whole build (and its submitit jobs) killed once the first adapter exists; the same command again
    skips that adapter and trains the rest."""
    import signal
    import subprocess
    import time

    from cat_seg.checkpoint import save_checkpoint
    from cat_seg.config import load_config
    from cat_seg.data.synthetic import write_synthetic
    from cat_seg.modeling import build_model

    root = tmp_path / "data"
    write_synthetic("acdc", root, 4, seed=0, conditions=["rain", "fog", "snow"])
    base = tmp_path / "base.pth"
    torch.manual_seed(0)
    save_checkpoint(build_model(load_config(TINY_CONFIG), "cpu"), base)
    library, runs = tmp_path / "loradb", tmp_path / "runs"
    names = ["acdc-rain", "acdc-fog", "acdc-snow"]
    argv = [
        "--source_domains", str(_domains(tmp_path / "domains.yaml", names)),
        "--lora_library_path", str(library), "--output_dir", str(runs),
        "--model_weights", str(base), "--embedding_model", "catseg", "--config", str(TINY_CONFIG),
        "--datasets_root", str(root), "--device", "cpu", "--executor", "local", "--jobs", "1",
        "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "4", "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip
    build = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train_library.py"), *argv],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches the submitit jobs too
    )
    first = library / "acdc-rain" / "adapter_model.safetensors"
    deadline = time.monotonic() + 300
    while not first.is_file() and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(build.pid, signal.SIGKILL)
    build.wait()
    assert first.is_file(), "the first adapter never appeared"
    assert not (library / "acdc-snow").exists()  # killed before the last one was trained

    assert main(argv) == 0
    status = {
        line.split()[0]: line.rstrip()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("acdc-")
    }
    assert status["acdc-rain"].endswith("done before")
    assert status["acdc-fog"].endswith(("trained", "trained (resumed)"))
    assert status["acdc-snow"].endswith("trained")
    for name in names:
        assert (library / name / "adapter_model.safetensors").is_file()
        assert (library / name / f"{name}_statistics.npz").is_file()
