"""Running command-line jobs on this machine or on a Slurm cluster, through ``submitit``.

``train_library.py`` (and any tool that fans work out) describes each job as a :class:`CommandTask`: a
command line, a log file that receives its output, and environment variables. Then:

* :func:`run_local`: submitit's local executor, a queue with ``len(slots)`` jobs at a time; a slot is a GPU
  id (the job sees only that GPU through ``CUDA_VISIBLE_DEVICES``) or None (a CPU job, with an equal share
  of the cores through ``OMP_NUM_THREADS``).
* :func:`run_slurm`: submitit's Slurm executor, the tasks as one job array (``SlurmOptions``), waited for.
* :func:`sbatch_script`: the ``sbatch`` script :func:`run_slurm` would submit (for ``--dry_run``; no cluster
  needed).

A job that fails (non-zero exit, crash, Slurm error) is reported through ``on_done`` and does not stop the
others. :func:`add_executor_flags` / :func:`executor_options` give every tool the same flags.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CommandTask",
    "ExecutorError",
    "ExecutorOptions",
    "SlurmOptions",
    "add_executor_flags",
    "executor_options",
    "log_tail",
    "run_local",
    "run_logged",
    "run_slurm",
    "run_tasks",
    "sbatch_script",
    "slurm_minutes",
]

REPO_ROOT = Path(__file__).resolve().parents[1]

#: ``on_done(name, exit status or None when the job crashed, seconds, error line)``
OnDone = Callable[[str, "int | None", float, str], None]


class ExecutorError(ValueError):
    """Executor flags that cannot work; the message names the flag."""


@dataclass(frozen=True)
class CommandTask:
    """One job: ``command`` run in the repository root with ``env`` on top of the environment, its output
    appended to ``log``."""

    name: str
    command: tuple[str, ...]
    log: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SlurmOptions:
    """What ``sbatch`` gets (submitit's Slurm parameter names in :meth:`parameters`)."""

    partition: str | None = None
    time_minutes: int = 24 * 60
    gpus_per_job: int = 1
    cpus_per_gpu: int = 8
    array_parallelism: int = 8
    account: str | None = None
    qos: str | None = None

    def parameters(self, name: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "job_name": name,
            "time": self.time_minutes,
            "nodes": 1,
            "ntasks_per_node": 1,  # the job's command starts its own processes (one per GPU)
            "gpus_per_node": self.gpus_per_job,
            "cpus_per_task": self.cpus_per_gpu * max(self.gpus_per_job, 1),
            "array_parallelism": self.array_parallelism,
        }
        for key, value in (("partition", self.partition), ("account", self.account), ("qos", self.qos)):
            if value:
                params[key] = value
        return params


@dataclass(frozen=True)
class ExecutorOptions:
    """The executor flags of a tool (:func:`add_executor_flags`)."""

    executor: str = "local"
    slots: tuple[str | None, ...] = (None,)
    slurm: SlurmOptions = SlurmOptions()
    dry_run: bool = False


def add_executor_flags(
    parser: argparse.ArgumentParser,
    *,
    unit: str,
    default: str | None = "local",
    executor_help: str | None = None,
) -> None:
    """``--executor``, ``--gpus``, ``--jobs``, ``--slurm_*`` and ``--dry_run``; ``unit`` names one job's work
    in the help texts (e.g. "adapter"); ``default``/``executor_help``: ``--executor``'s default and help."""
    parser.add_argument(
        "--executor",
        choices=("local", "slurm"),
        default=default,
        help=executor_help or f"where the jobs run (default: {default})",
    )
    parser.add_argument("--gpus", help=f"local: GPU ids, one {unit} per GPU at a time (e.g. 0,1,2,3)")
    parser.add_argument(
        "--jobs", type=int, default=1, help=f"local without --gpus: {unit}s run at once on CPU (default: 1)"
    )
    parser.add_argument("--slurm_partition", help="slurm: partition (sbatch --partition)")
    parser.add_argument(
        "--slurm_time",
        default="24:00:00",
        help="slurm: time limit per job, in Slurm's format (minutes, H:MM:SS; default: 24:00:00)",
    )
    parser.add_argument(
        "--slurm_gpus_per_job", type=int, default=1, help=f"slurm: GPUs per {unit} (default: 1)"
    )
    parser.add_argument("--slurm_cpus_per_gpu", type=int, default=8, help="slurm: CPUs per GPU (default: 8)")
    parser.add_argument(
        "--slurm_array_parallelism",
        type=int,
        default=8,
        help="slurm: array tasks running at once (default: 8)",
    )
    parser.add_argument("--slurm_account", help="slurm: account (sbatch --account)")
    parser.add_argument("--slurm_qos", help="slurm: quality of service (sbatch --qos)")
    parser.add_argument(
        "--dry_run", action="store_true", help="print the plan (and the sbatch script) and stop"
    )


def executor_options(args: argparse.Namespace) -> ExecutorOptions:
    """Check and gather the flags of :func:`add_executor_flags`.

    Raises:
        ExecutorError: a flag out of range, naming it.
    """
    if args.jobs < 1:
        raise ExecutorError(f"--jobs must be >= 1, got {args.jobs}")
    slots: tuple[str | None, ...]
    if args.gpus:
        ids = [g.strip() for g in args.gpus.split(",")]
        if not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
            raise ExecutorError(f"--gpus {args.gpus!r}: expected distinct GPU ids such as 0,1,2,3")
        slots = tuple(ids)
    else:
        slots = (None,) * args.jobs
    for flag in ("slurm_gpus_per_job", "slurm_cpus_per_gpu", "slurm_array_parallelism"):
        if getattr(args, flag) < 1:
            raise ExecutorError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    slurm = SlurmOptions(
        partition=args.slurm_partition,
        time_minutes=slurm_minutes(args.slurm_time),
        gpus_per_job=args.slurm_gpus_per_job,
        cpus_per_gpu=args.slurm_cpus_per_gpu,
        array_parallelism=args.slurm_array_parallelism,
        account=args.slurm_account,
        qos=args.slurm_qos,
    )
    return ExecutorOptions(executor=args.executor, slots=slots, slurm=slurm, dry_run=args.dry_run)


def slurm_minutes(text: str) -> int:
    """A time limit in minutes, read as Slurm reads ``--time``: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``
    or ``D-H:M:S`` (seconds round up to a minute).

    Raises:
        ExecutorError: not that format, or not positive.
    """
    value = str(text).strip()
    try:
        days, dash, clock = value.partition("-") if "-" in value else ("0", "", value)
        parts = [int(x) for x in clock.split(":")]
        if int(days) < 0 or any(x < 0 for x in parts) or not 1 <= len(parts) <= 3:
            raise ValueError
        if dash:  # D-H, D-H:M, D-H:M:S
            hours, minutes, seconds = (parts + [0, 0])[:3]
        elif len(parts) == 3:  # H:M:S
            hours, minutes, seconds = parts
        else:  # M, M:S
            hours, minutes, seconds = 0, parts[0], (parts[1] if len(parts) == 2 else 0)
        total = int(days) * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    except ValueError:
        raise ExecutorError(
            f"--slurm_time {text!r}: expected Slurm's time format (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S)"
        ) from None
    if total <= 0:
        raise ExecutorError(f"--slurm_time {text!r}: must be positive")
    return total


# -- one job (inside the executor's process) -----------------------------------------------------------------


def run_logged(command: Sequence[str], log: str, env: dict[str, str], cwd: str) -> int:
    """Run ``command`` with its output appended to ``log``; returns its exit status (never raises on it)."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(command)}\n")
        f.flush()
        return subprocess.run(
            list(command), cwd=cwd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT
        ).returncode


def log_tail(log: Path) -> str:
    """The last non-empty line of a log ("" when it cannot be read)."""
    try:
        lines = [line for line in Path(log).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _call(task: CommandTask, extra_env: dict[str, str] | None = None) -> int:
    return run_logged(task.command, str(task.log), {**task.env, **(extra_env or {})}, str(REPO_ROOT))


def _outcome(job: Any) -> tuple[int | None, str]:
    """A finished submitit job's exit status, or None and the last line of its error."""
    try:
        return job.result(), ""
    except Exception as e:  # noqa: BLE001 - a job's crash is that job's failure, not the caller's
        text = str(e).strip()
        return None, text.splitlines()[-1] if text else type(e).__name__


# -- executors ------------------------------------------------------------------------------------------------


def run_local(
    tasks: Sequence[CommandTask], slots: Sequence[str | None], folder: Path, on_done: OnDone
) -> None:
    """Run ``tasks`` with submitit's local executor, ``len(slots)`` at a time, in order; submitit's own
    files go to ``folder``. ``on_done`` is called as each job ends."""
    import submitit

    if not slots:
        raise ExecutorError("no slot to run jobs in")
    executor = submitit.AutoExecutor(folder=folder, cluster="local")
    executor.update_parameters(timeout_min=60 * 24 * 7)
    pending = list(tasks)
    free = list(slots)
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    running: dict[str, tuple[Any, str | None, float]] = {}
    while pending or running:
        while pending and free:
            task = pending.pop(0)
            slot = free.pop(0)
            extra = {"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {"OMP_NUM_THREADS": str(threads)}
            running[task.name] = (
                executor.submit(functools.partial(_call, task, extra)),
                slot,
                time.monotonic(),
            )
        time.sleep(0.2)
        for name in [n for n, (job, _, _) in running.items() if job.done()]:
            job, slot, start = running.pop(name)
            free.append(slot)
            status, error = _outcome(job)
            on_done(name, status, time.monotonic() - start, error)


def run_slurm(
    tasks: Sequence[CommandTask], options: SlurmOptions, folder: Path, on_done: OnDone, *, name: str
) -> None:
    """Submit ``tasks`` as one Slurm job array (one task each; a single task as a plain job) and wait for
    them; needs ``srun``/``sbatch`` (submitit refuses to start otherwise)."""
    import submitit

    if not tasks:
        return
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**options.parameters(name))
    started = time.monotonic()
    if len(tasks) == 1:
        jobs = [executor.submit(_call, tasks[0])]
    else:
        jobs = executor.map_array(_call, list(tasks))
    print(f"[{name}] submitted {len(jobs)} Slurm job(s): {jobs[0].job_id.split('_')[0]}", flush=True)
    for task, job in zip(tasks, jobs):
        status, error = _outcome(job)
        on_done(task.name, status, time.monotonic() - started, error)


def run_tasks(
    tasks: Sequence[CommandTask], options: ExecutorOptions, folder: Path, on_done: OnDone, *, name: str
) -> None:
    """:func:`run_local` or :func:`run_slurm`, as ``options`` says; submitit's files under ``folder``."""
    if options.executor == "slurm":
        run_slurm(tasks, options.slurm, folder / "slurm" / "%j", on_done, name=name)
    else:
        run_local(tasks, options.slots, folder / "submitit", on_done)


def sbatch_script(options: SlurmOptions, folder: Path, count: int, *, name: str) -> str:
    """The ``sbatch`` script :func:`run_tasks` submits for ``count`` tasks (the array line included)."""
    from submitit.slurm import slurm

    params = options.parameters(name)
    if count > 1:
        params["map_count"] = count
    command = f"{sys.executable} -u -m submitit.core._submit {folder / 'slurm' / '%j'}"
    # submitit's own script writer (the one SlurmExecutor uses), so the text is what would be submitted
    return slurm._make_sbatch_string(command=command, folder=folder / "slurm" / "%j", **params)
