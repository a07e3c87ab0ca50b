"""``experiments.py --executor local|slurm``: one job per target domain, then ``--collect``.

A run over N target domains becomes N runs of ``experiments.py`` with the same command line, except that
each gets a one-target list and its own output folder; :mod:`.executors` runs them (submitit's local
executor, a queue over CPU or GPU slots, or one Slurm job array). When every job has succeeded,
:func:`collect` merges their outputs into the run's own files. The targets of a run are independent (each
is evaluated with its own vocabulary, its own shard of images and its own weights; nothing carries over
from one target to the next), and the collected files are written by the same :class:`ResultsBook` code
from the same numbers, so they are byte-identical to those of one run over all targets.

Layout of ``--output_dir``::

    results.json, metrics.json, ..., summary.txt, run_config.json   the collected run (as a single run's)
    targets/<target>/    one target's run: target_domains.yaml (its one-target list), experiments.log (the
                         job's output), and the files of a one-target run (run_config.json, metrics.json,
                         results.json or <experiment>/..., progress/)
    jobs/                submitit's own files (jobs/submitit/ locally, jobs/slurm/<job id>/ on Slurm)

``run_config.json`` of the collected run is the first target's with the run-wide entries made whole (the
target list, the adapters, the fingerprint's targets and domain specs, the command line): see
:func:`collected_run_config` for what cannot equal a single run's.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cat_seg.data.registry import domain_spec
from cat_seg.engine.io import atomic_write_json
from cat_seg.fileio import atomic_write_text

from .executors import CommandTask, ExecutorOptions, log_tail, run_tasks, sbatch_script
from .plan import ExperimentPlan
from .reporting import METRICS_FILE, RESULTS_FILE, RUN_CONFIG_FILE, ResultsBook
from .settings import EXPERIMENTS, ExperimentError

__all__ = [
    "JOB_NAME",
    "LIST_FILE",
    "LOG_FILE",
    "TARGETS_DIR",
    "CollectError",
    "TargetJob",
    "TargetRun",
    "collect",
    "collected_run_config",
    "describe",
    "holds_results",
    "job_command",
    "matches",
    "plan_jobs",
    "read_target_run",
    "refuse_earlier_runs",
    "run_jobs",
    "target_folder",
    "without_flags",
]

TARGETS_DIR = "targets"
JOBS_DIR = "jobs"
LIST_FILE = "target_domains.yaml"
LOG_FILE = "experiments.log"
JOB_NAME = "semla-experiments"  # the Slurm job name
#: Fingerprint entries that differ between the targets of one split run (the rest must agree).
_PER_TARGET = ("targets", "domain_specs")


class CollectError(ValueError):
    """Per-target outputs that cannot be collected; the message names the targets and their folders."""


def target_folder(output_dir: str | os.PathLike, target: str) -> Path:
    """``<output_dir>/targets/<target>/``: one target's run."""
    return Path(output_dir) / TARGETS_DIR / target


# -- the command line of a job -------------------------------------------------------------------------------


def without_flags(
    parser: argparse.ArgumentParser, argv: Sequence[str], remainder: Sequence[str], drop: set[str]
) -> tuple[list[str], list[str]]:
    """Split ``argv`` into its options (less those whose destination is in ``drop``) and its trailing
    ``KEY VALUE`` overrides, keeping every other token as given.

    Args:
        parser: the parser that read ``argv`` (its options, with argparse's unique-prefix spellings).
        argv: the command line.
        remainder: what the trailing positional (``argparse.REMAINDER``) received: a suffix of ``argv``.
        drop: ``dest`` names of the options to leave out, with their values.
    Returns:
        (the options kept, the trailing overrides).
    """
    argv = list(argv)
    cut = len(argv) - len(remainder)
    head, tail = argv[:cut], argv[cut:]
    if list(remainder) != tail:
        raise ValueError(f"the overrides {list(remainder)} are not at the end of the command line")
    by_option = {option: action for action in parser._actions for option in action.option_strings}
    kept: list[str] = []
    i = 0
    while i < len(head):
        token = head[i]
        name, eq, _ = token.partition("=")
        action = by_option.get(name)
        if action is None and name.startswith("--") and parser.allow_abbrev:
            candidates = {a for option, a in by_option.items() if option.startswith(name)}
            action = candidates.pop() if len(candidates) == 1 else None
        count = 1
        if action is not None and not eq and action.nargs != 0:
            if action.nargs in (None, 1):
                count = 2
            else:  # "+" / "*": the values up to the next option, as argparse reads them
                while i + count < len(head) and not head[i + count].startswith("-"):
                    count += 1
        if action is None or action.dest not in drop:
            kept += head[i : i + count]
        i += count
    return kept, tail


# -- the jobs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetJob:
    """One target's job.

    Attributes:
        target: the domain.
        entry: what its one-target list holds (the name, or a domain spec file's absolute path).
        folder: its output folder (``targets/<target>/``).
        command: the ``experiments.py`` command line of the job.
        done_before: the folder already holds this target's finished run with this run's settings (skipped).
    """

    target: str
    entry: str
    folder: Path
    command: tuple[str, ...]
    done_before: bool = False

    @property
    def list_file(self) -> Path:
        return self.folder / LIST_FILE

    @property
    def log(self) -> Path:
        return self.folder / LOG_FILE


def job_command(python: str, script: Path, args: Sequence[str], cwd: Path, root: Path) -> tuple[str, ...]:
    """``python script args``, run in ``cwd`` (the executors start jobs in the repository ``root``; a
    command started elsewhere is run through ``sh -c 'cd ...'`` so that relative paths mean the same)."""
    command = (python, str(script), *args)
    if Path(cwd).resolve() == Path(root).resolve():
        return command
    return ("sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *command)


def plan_jobs(
    plan: ExperimentPlan,
    options: Sequence[str],
    overrides: Sequence[str],
    *,
    script: Path,
    cwd: Path,
    root: Path,
) -> list[TargetJob]:
    """One job per target of ``plan``: ``python script options --target_domains <its list> --output_dir
    targets/<target> overrides`` (see :func:`job_command` for ``cwd`` and ``root``). With ``--resume``, a
    target whose folder holds its finished run with the plan's settings is skipped.

    Args:
        plan: the checked run.
        options: the run's command line less ``--target_domains``, ``--output_dir`` and the executor flags.
        overrides: its trailing ``KEY VALUE`` pairs (they stay last).
        script: ``experiments.py``.
    """
    jobs = []
    for target in plan.targets:
        folder = target_folder(plan.output_dir, target.name)
        args = [
            *options,
            "--target_domains",
            str(folder / LIST_FILE),
            "--output_dir",
            str(folder),
            *overrides,
        ]
        done = False
        if plan.settings.resume:
            try:
                done = matches(read_target_run(plan.output_dir, target.name), plan.fingerprint)
            except CollectError:
                done = False
        # a domain of your own is written as its spec file's absolute path (the list may name it relatively)
        spec = domain_spec(target.name)
        jobs.append(
            TargetJob(
                target=target.name,
                entry=str(spec.path) if spec is not None else target.name,
                folder=folder,
                command=job_command(sys.executable, script, args, cwd, root),
                done_before=done,
            )
        )
    return jobs


def refuse_earlier_runs(output_dir: Path, targets: Sequence[str]) -> None:
    """A target folder holding a run needs ``--resume`` or ``--overwrite``, as the run's own folder does.

    Raises:
        ExperimentError: naming the first such folder.
    """
    for target in targets:
        found = holds_results(target_folder(output_dir, target))
        if found is not None:
            raise ExperimentError(
                [
                    f"{found.parent} already holds results ({found.name}); pass --resume to continue that run, "
                    "--overwrite to start over, or choose another --output_dir"
                ]
            )


def describe(
    jobs: Sequence[TargetJob], options: ExecutorOptions, output_dir: Path, *, target_list: Path
) -> str:
    """The plan in words (``--dry_run``): each target's state and command, the executor, the collect step."""
    todo = [j for j in jobs if not j.done_before]
    lines = [
        f"experiments.py: {len(jobs)} target(s) of {target_list}, one job each; "
        f"outputs in {output_dir / TARGETS_DIR}/<target>/, collected into {output_dir}"
    ]
    for job in jobs:
        lines.append(f"  {job.target:<24} {'finished, skipped' if job.done_before else 'to run'}")
        if not job.done_before:
            lines.append(f"      $ {shlex.join(job.command)}")
            lines.append(f"      list: {job.list_file} (- {job.entry}); log: {job.log}")
    if options.executor == "local":
        gpus = [s for s in options.slots if s is not None]
        where = (
            f"GPUs {','.join(gpus)}, one target each at a time" if gpus else f"{len(options.slots)} at a time"
        )
        lines.append(f"executor: local ({where}); submitit's files in {output_dir / JOBS_DIR}")
    else:
        lines.append(f"executor: slurm; the sbatch script of the {len(todo)} job(s):")
        lines.append(sbatch_script(options.slurm, output_dir / JOBS_DIR, max(len(todo), 1), name=JOB_NAME))
    lines.append(
        "then, when every job has succeeded: the collect step (experiments.py ... --collect) writes the run's "
        f"files into {output_dir}"
    )
    return "\n".join(lines)


def run_jobs(jobs: Sequence[TargetJob], options: ExecutorOptions, output_dir: Path) -> list[str]:
    """Write each job's target list, run the jobs (a failure does not stop the others) and report each as it
    ends: done (exit status 0 and its target's run finished), or FAILED with the last line of its log.

    Returns:
        the failed targets, in target order.
    """
    todo = [j for j in jobs if not j.done_before]
    by_target = {j.target: j for j in todo}
    failed: set[str] = set()
    for job in jobs:
        if job.done_before:
            print(f"[experiments] {job.target}: finished in an earlier run, skipped", flush=True)
    for job in todo:
        atomic_write_text(job.list_file, f"- {job.entry}\n")

    def done(name: str, status: int | None, seconds: float, error: str) -> None:
        job = by_target[name]
        if status == 0:
            try:
                read_target_run(output_dir, name)
                problem = None
            except CollectError as e:
                problem = str(e)
        else:
            problem = log_tail(job.log) or error or f"exit status {status}"
        if problem is None:
            print(f"[experiments] {name}: done in {seconds:.0f} s", flush=True)
        else:
            failed.add(name)
            print(f"[experiments] {name}: FAILED: {problem} (log: {job.log})", flush=True)

    tasks = [CommandTask(j.target, j.command, j.log) for j in todo]
    if tasks:
        run_tasks(tasks, options, output_dir / JOBS_DIR, done, name=JOB_NAME)
    return [j.target for j in jobs if j.target in failed]


# -- collecting ----------------------------------------------------------------------------------------------


@dataclass
class TargetRun:
    """A finished one-target run: its ``run_config.json`` and its outputs."""

    target: str
    folder: Path
    config: dict[str, Any]
    book: ResultsBook


def read_target_run(output_dir: Path, target: str) -> TargetRun:
    """The finished run of ``target`` in ``targets/<target>/``.

    Raises:
        CollectError: no run there, a run of other targets, or not finished (naming the target and folder).
    """
    folder = target_folder(output_dir, target)
    config_path = folder / RUN_CONFIG_FILE
    if not config_path.is_file():
        raise CollectError(f"{target} ({folder}): not run (no {RUN_CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        columns, sources = list(config["experiments"]), list(config["sources"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CollectError(f"{target} ({folder}): {RUN_CONFIG_FILE} cannot be read ({e})") from None
    if config.get("targets") != [target]:
        raise CollectError(f"{target} ({folder}): holds a run of the targets {config.get('targets')}")
    try:
        book = ResultsBook.load(folder, experiments=columns, targets=[target], sources=sources)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CollectError(f"{target} ({folder}): its outputs cannot be read ({e})") from None
    if book.finished() != [target]:
        raise CollectError(f"{target} ({folder}): not finished (no metrics of every experiment)")
    return TargetRun(target, folder, config, book)


def _expected(fingerprint: Mapping[str, Any], target: str) -> dict[str, Any]:
    """The fingerprint of the one-target run of ``target`` within a run of ``fingerprint``."""
    names = set(fingerprint["sources"]) | {target}
    return {
        **fingerprint,
        "targets": [target],
        "domain_specs": {k: v for k, v in fingerprint["domain_specs"].items() if k in names},
    }


def matches(run: TargetRun, fingerprint: Mapping[str, Any]) -> bool:
    """Whether ``run`` is its target's share of the run ``fingerprint`` describes."""
    return run.config.get("fingerprint") == _expected(fingerprint, run.target)


def _check_same_run(runs: Sequence[TargetRun], columns: Sequence[str] | None) -> None:
    """The runs share every setting but their target (and, ``columns`` given, have those experiments)."""
    first = runs[0]

    def shared(run: TargetRun) -> dict[str, Any]:
        fingerprint = run.config.get("fingerprint", {})
        return {
            "experiments": run.config.get("experiments"),
            **{k: v for k, v in fingerprint.items() if k not in _PER_TARGET},
        }

    reference = shared(first)
    specs: dict[str, tuple[str, Any]] = {}  # domain -> (the first target whose run has it, its entry)
    for run in runs:
        if columns is not None and run.config.get("experiments") != list(columns):
            raise CollectError(
                f"{run.target} ({run.folder}) was run with the experiments {run.config.get('experiments')}; "
                f"this command asks for {list(columns)}"
            )
        here = shared(run)
        differ = sorted(k for k in reference.keys() | here.keys() if reference.get(k) != here.get(k))
        if differ:
            raise CollectError(
                f"{run.target} ({run.folder}) was run with other settings than {first.target} "
                f"({', '.join(differ)} differ); run it again with the same command"
            )
        for name, entry in run.config.get("fingerprint", {}).get("domain_specs", {}).items():
            seen = specs.setdefault(name, (run.target, entry))
            if seen[1] != entry:
                raise CollectError(
                    f"{run.target} ({run.folder}) and {seen[0]} were run with different specs of domain {name!r}"
                )


def collected_run_config(runs: Sequence[TargetRun], argv: Sequence[str]) -> dict[str, Any]:
    """``run_config.json`` of the whole run: what a single run over the targets of ``runs`` writes.

    Starts from the first target's and makes the run-wide entries whole: ``targets``; ``adapters`` (the
    sources, then the oracle adapters of the targets that are not sources, in target order, as the single
    run's library lists them); the fingerprint's ``targets`` and ``domain_specs`` (so that ``--resume`` of the
    single-run command accepts the collected folder); ``argv`` (the given command line, the executor flags
    left out: a single run's) and ``command`` (the first job's interpreter and script with that ``argv``).
    What describes one invocation rather than the run stays the first job's (``cwd``, ``host``, ``device``,
    ...), except ``time``, the earliest job's start. Only ``time`` and ``command`` then differ from what a
    single run started by the same command would write (it starts at another time, and its ``command`` is
    its own ``sys.argv``).
    """
    first = runs[0].config
    config = copy.deepcopy(first)
    targets = [run.target for run in runs]
    config["targets"] = targets
    adapters: dict[str, Any] = {}
    for run in runs:
        for adapter in run.config.get("adapters", []):
            adapters.setdefault(adapter["name"], adapter)
    config["adapters"] = list(adapters.values())
    fingerprint = config.get("fingerprint")
    if isinstance(fingerprint, dict):
        fingerprint["targets"] = targets
        specs: dict[str, Any] = {}
        for run in runs:
            specs.update(run.config["fingerprint"].get("domain_specs", {}))
        order = dict.fromkeys([*fingerprint.get("sources", []), *targets])
        fingerprint["domain_specs"] = {name: specs[name] for name in order if name in specs}
    old_argv = list(first.get("argv", []))
    command = list(first.get("command", []))
    if old_argv and command[-len(old_argv) :] == old_argv:
        command = command[: -len(old_argv)]
    config["command"] = [*command, *argv]
    config["argv"] = list(argv)
    times = [run.config["time"] for run in runs if isinstance(run.config.get("time"), str)]
    if times:
        config["time"] = min(times, key=datetime.datetime.fromisoformat)
    return config


def collect(
    output_dir: Path,
    targets: Sequence[str],
    *,
    argv: Sequence[str],
    columns: Sequence[str] | None = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> ResultsBook:
    """Merge the one-target runs under ``output_dir/targets/`` into the run's own files.

    Everything is read and checked before anything is written; each file is then written atomically, by
    the code a single run writes its files with, from the same numbers: ``results.json``, ``weights.json``
    and ``weights_reference.json`` (per experiment), ``metrics.json`` and ``summary.txt`` are byte-identical
    to a single run's over ``targets``; ``run_config.json`` is :func:`collected_run_config`'s.

    Args:
        output_dir: the run's output folder.
        targets: the run's targets, in the order of its list (the order of the collected files).
        argv: the run's command line (the executor flags and ``--collect`` left out), for run_config.json.
        columns: the experiment columns the command asks for (checked against the runs'), if known.
        fingerprint: the run's settings (``ExperimentPlan.fingerprint``), if known: every target must have
            been run with them.
    Returns:
        the collected results.
    Raises:
        CollectError: a target missing or unfinished (all of them named with their folders, in one line),
            or runs made with other settings.
    """
    output_dir = Path(output_dir)
    runs, problems = [], []
    for target in targets:
        try:
            runs.append(read_target_run(output_dir, target))
        except CollectError as e:
            problems.append(str(e))
    if problems:
        raise CollectError(
            f"--collect: {len(problems)} of {len(targets)} target(s) missing or not finished: "
            + "; ".join(problems)
            + " (run their jobs again, with --resume)"
        )
    _check_same_run(runs, columns)
    if fingerprint is not None:
        for run in runs:
            if not matches(run, fingerprint):
                raise CollectError(
                    f"{run.target} ({run.folder}) was run with other settings than this command's"
                )
    first = runs[0].book
    book = ResultsBook(first.experiments, list(targets), first.sources)
    for run in runs:
        t = run.target
        semla = {column: weights[t] for column, weights in run.book.semla.items()}
        book.add_target(
            t,
            run.book.metrics[t],
            semla=semla or None,
            uniform=run.book.uniform.get(t),
        )
    atomic_write_json(output_dir / RUN_CONFIG_FILE, collected_run_config(runs, argv))
    book.write(output_dir)
    return book


def holds_results(folder: Path) -> Path | None:
    """The first output file of a run in ``folder`` (None: no run there)."""
    candidates = [folder / RUN_CONFIG_FILE, folder / METRICS_FILE, folder / RESULTS_FILE]
    candidates += [folder / e / RESULTS_FILE for e in EXPERIMENTS]
    return next((p for p in candidates if p.is_file()), None)
