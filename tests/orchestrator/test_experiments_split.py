"""experiments.py split into one job per target (``--executor``) and ``--collect``: the collected files equal a
single run's byte for byte; a missing target is one line naming it; the Slurm plan without a cluster."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from engine_testlib import single_thread
from semla_world import World, experiments_main, read_json

from domain_orchestrator.reporting import ImageWeights, ResultsBook
from domain_orchestrator.split import CollectError, collect, target_folder, without_flags

ALL = ("zeroshot", "oracle", "uniform", "semla")
# a150 is no source: its oracle adapter joins the library after the sources (the run_config's adapters)
SOURCES = ["acdc-rain", "muses-fog-day", "acdc-fog"]
TARGETS = ["a150", "muses-fog-day", "acdc-rain"]  # not in library order: the collected order is the list's


def _lists(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sources, targets = folder / "sources.yaml", folder / "targets.yaml"
    sources.write_text("".join(f"- {s}\n" for s in SOURCES))
    targets.write_text("".join(f"- {t}\n" for t in TARGETS))
    return sources, targets


def _args(world: World, out: Path, lists: tuple[Path, Path], *extra: str) -> list[str]:
    args = world.args(out, *ALL, extra=("--remove_target_adapter", *extra))
    args[args.index("--source_domains") + 1] = str(lists[0])
    args[args.index("--target_domains") + 1] = str(lists[1])
    return [*args, "DATALOADER.NUM_WORKERS", "0"]  # KEY VALUE overrides pass through to every job


def _run(argv: list[str]) -> int:
    with single_thread():
        return experiments_main()(argv)


def _files(folder: Path) -> list[str]:
    """The output files of a run, relative to its folder (the per-target runs and submitit's files aside)."""
    skip = ("targets/", "jobs/", "progress/")
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not p.relative_to(folder).as_posix().startswith(skip)
    )


@pytest.mark.slow
def test_split_by_target_and_collected_equals_one_run(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lists = _lists(tmp_path / "lists")
    single = tmp_path / "single"
    assert _run(_args(world, single, lists)) == 0
    # One thread per job (the local executor gives each job its share of the cores), as the in-process run
    # computes: the same kernels, and no job waiting on a descheduled thread of a busy machine.
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    split = tmp_path / "split"
    capsys.readouterr()
    assert _run(_args(world, split, lists, "--executor", "local", "--jobs", "1")) == 0
    out = capsys.readouterr().out
    assert all(f"[experiments] {t}: done" in out for t in TARGETS), out
    for target in TARGETS:
        folder = target_folder(split, target)
        assert (folder / "target_domains.yaml").read_text() == f"- {target}\n"
        assert read_json(folder / "run_config.json")["targets"] == [target]
        assert "DATALOADER.NUM_WORKERS 0" in " ".join(read_json(folder / "run_config.json")["argv"])
    files = _files(single)
    assert files == _files(split)
    assert {"metrics.json", "summary.txt", "run_config.json", "semla/weights_reference.json"} <= set(files)
    for name in files:
        if name != "run_config.json":
            assert (split / name).read_bytes() == (single / name).read_bytes(), name
    # run_config.json: equal but for the start time and the interpreter's command line
    one, collected = read_json(single / "run_config.json"), read_json(split / "run_config.json")
    assert [a["name"] for a in collected["adapters"]] == [*SOURCES, "a150"]
    assert collected["argv"] == _args(world, split, lists)  # the command, its executor flags left out
    for key in ("time", "command", "argv"):
        one.pop(key), collected.pop(key)
    assert collected == one
    # The single run's --resume accepts the collected folder as a finished run and keeps its files.
    before = (split / "metrics.json").read_bytes()
    resumed = _args(world, split, lists, "--resume")
    assert _run(resumed) == 0
    assert (split / "metrics.json").read_bytes() == before
    # The split run with --resume has nothing left to run; it collects again, to the same bytes.
    capsys.readouterr()
    assert _run([*resumed[:-2], "--executor", "local", *resumed[-2:]]) == 0
    out = capsys.readouterr().out
    assert all(f"{t}: finished in an earlier run, skipped" in out for t in TARGETS), out
    assert (split / "semla" / "weights.json").read_bytes() == (single / "semla" / "weights.json").read_bytes()
    # --collect on a copy with a target missing: one line naming it and its folder, nothing written
    copy = Path(shutil.copytree(split, tmp_path / "copy"))
    shutil.rmtree(target_folder(copy, "muses-fog-day"))
    before = {name: (copy / name).read_bytes() for name in files}
    capsys.readouterr()
    assert _run(_args(world, copy, lists, "--collect")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("experiments.py: error: --collect:"), err
    assert "muses-fog-day" in err[0] and str(target_folder(copy, "muses-fog-day")) in err[0]
    assert "a150" not in err[0] and "acdc-rain" not in err[0]
    assert {name: (copy / name).read_bytes() for name in files} == before


@pytest.mark.slow
def test_slurm_dry_run_prints_the_job_array(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lists = _lists(tmp_path / "lists")
    out = tmp_path / "out"
    flags = ["--slurm_partition", "p", "--slurm_time", "2:00:00", "--slurm_array_parallelism", "3"]
    assert _run(_args(world, out, lists, "--executor", "slurm", "--dry_run", *flags)) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --partition=p" in text
    assert "#SBATCH --time=120" in text  # Slurm's minutes
    assert f"#SBATCH --array=0-{len(TARGETS) - 1}%3" in text
    for target in TARGETS:
        folder = target_folder(out.absolute(), target)
        line = next(s for s in text.splitlines() if "$ " in s and str(folder / "target_domains.yaml") in s)
        assert f"--output_dir {folder} " in line and line.endswith("DATALOADER.NUM_WORKERS 0")
        assert "--executor" not in line and "--slurm" not in line and "--dry_run" not in line
    assert not out.exists()  # a plan only: nothing written


@pytest.mark.slow
def test_oracle_alone_of_a_target_that_is_no_source(world: World, tmp_path: Path) -> None:
    """A one-target job of oracle: the library holds that target's adapter only, not the sources (it
    failed with "adapters not in the library" before the split runs needed it)."""
    lists = _lists(tmp_path / "lists")
    lists[1].write_text("- a150\n")
    args = _args(world, tmp_path / "out", lists)
    args[args.index("--experiment") + 1 : args.index("--experiment") + 1 + len(ALL)] = ["oracle"]
    assert _run(args) == 0
    assert list(read_json(tmp_path / "out" / "metrics.json")["a150"]) == ["oracle"]


# -- without the world: collect on hand-made per-target runs ------------------------------------------------

EXPERIMENTS = ["zeroshot", "uniform", "semla"]
HAND_SOURCES = ["acdc-rain", "acdc-fog"]
HAND_TARGETS = ["muses-fog-day", "acdc-rain", "a150"]


def _metrics(i: int) -> dict:
    return {
        e: {"mIoU": 10.0 / (i + 3) + j, "per_class": [math.nan, 0.1 + i], "num_images": 3}
        for j, e in enumerate(EXPERIMENTS)
    }


def _hand_made_book(targets: list[str]) -> ResultsBook:
    book = ResultsBook(list(EXPERIMENTS), targets, HAND_SOURCES)
    for target in targets:
        i = HAND_TARGETS.index(target)
        weights = [
            ImageWeights(f"{target}/{k}.png", ("acdc-fog", "acdc-rain"), (0.7 - k / 30, 0.3 + k / 30))
            for k in range(2)
        ]
        book.add_target(target, _metrics(i), semla={"semla": weights}, uniform={s: 0.5 for s in HAND_SOURCES})
    return book


def _run_config(targets: list[str]) -> dict:
    fingerprint = {
        "experiments": EXPERIMENTS,
        "sources": HAND_SOURCES,
        "targets": targets,
        "domain_specs": {},
    }
    return {
        "time": "2026-01-01T00:00:00+00:00",
        "command": ["python", "experiments.py", "--target_domains", "t.yaml"],
        "argv": ["--target_domains", "t.yaml"],
        "experiments": EXPERIMENTS,
        "sources": HAND_SOURCES,
        "targets": targets,
        "adapters": [{"name": s} for s in HAND_SOURCES],
        "fingerprint": fingerprint,
    }


def _hand_made_split(output: Path, targets: list[str]) -> None:
    for target in targets:
        folder = target_folder(output, target)
        _hand_made_book([target]).write(folder)
        (folder / "run_config.json").write_text(json.dumps(_run_config([target]), indent=2) + "\n")


def test_collect_writes_what_one_book_of_every_target_writes(tmp_path: Path) -> None:
    _hand_made_split(tmp_path / "split", HAND_TARGETS)
    collect(tmp_path / "split", HAND_TARGETS, argv=["--target_domains", "all.yaml"], columns=EXPERIMENTS)
    _hand_made_book(HAND_TARGETS).write(tmp_path / "one")
    files = _files(tmp_path / "one")
    assert files == [f for f in _files(tmp_path / "split") if f != "run_config.json"]
    for name in files:
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    config = read_json(tmp_path / "split" / "run_config.json")
    assert config["targets"] == config["fingerprint"]["targets"] == HAND_TARGETS
    assert config["argv"] == ["--target_domains", "all.yaml"]
    assert config["command"] == ["python", "experiments.py", "--target_domains", "all.yaml"]


def test_collect_with_a_target_missing_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    _hand_made_split(out, ["muses-fog-day", "a150"])
    targets = tmp_path / "targets.yaml"
    targets.write_text("".join(f"- {t}\n" for t in HAND_TARGETS))
    argv = [
        "--experiment",
        *EXPERIMENTS,
        "--target_domains",
        str(targets),
        "--output_dir",
        str(out),
        "--collect",
    ]
    assert experiments_main()(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "acdc-rain" in err[0] and str(target_folder(out, "acdc-rain")) in err[0], err
    assert "muses-fog-day" not in err[0]
    assert not (out / "metrics.json").exists() and not (out / "run_config.json").exists()
    # an unfinished target (no metrics): named too
    _hand_made_split(out, ["acdc-rain"])
    (target_folder(out, "a150") / "metrics.json").write_text("{}")
    with pytest.raises(CollectError, match=r"a150 \(.*a150\): not finished"):
        collect(out, HAND_TARGETS, argv=[])
    # runs of other settings are not mixed
    _hand_made_split(out, ["a150"])
    config = read_json(target_folder(out, "a150") / "run_config.json")
    config["fingerprint"]["opts"] = ["TEST.SLIDING_WINDOW", "False"]
    (target_folder(out, "a150") / "run_config.json").write_text(json.dumps(config))
    with pytest.raises(CollectError, match="a150 .* other settings .*opts differ"):
        collect(out, HAND_TARGETS, argv=[])
    assert not (out / "metrics.json").exists()


def test_executor_flags_are_left_out_as_argparse_reads_them() -> None:
    parser = _parser()
    argv = [
        "--experiment", "zeroshot", "semla", "--exec", "slurm", "--target_domains=t.yaml", "--slurm_time", "1:00",
        "--output_dir", "o", "--dry_run", "--resume", "DATALOADER.NUM_WORKERS", "0", "--jobs", "2",
    ]  # fmt: skip
    args = parser.parse_args(argv)
    kept, tail = without_flags(
        parser, argv, args.opts, {"executor", "slurm_time", "dry_run", "target_domains"}
    )
    assert kept == ["--experiment", "zeroshot", "semla", "--output_dir", "o", "--resume"]
    assert tail == ["DATALOADER.NUM_WORKERS", "0", "--jobs", "2"]  # overrides are never read as flags


def _parser():  # noqa: ANN202
    experiments_main()
    import experiments

    return experiments.build_parser()


def test_executor_flags_need_executor(capsys: pytest.CaptureFixture[str]) -> None:
    main = experiments_main()
    assert main(["--experiment", "zeroshot", "--target_domains", "t.yaml", "--dry_run"]) == 1
    assert "--dry_run is an option of split runs" in capsys.readouterr().err
    assert (
        main(["--experiment", "zeroshot", "--target_domains", "t.yaml", "--collect", "--executor", "local"])
        == 1
    )
    assert "--collect only collects" in capsys.readouterr().err
