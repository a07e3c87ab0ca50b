"""Train a whole adapter library in one command: every missing adapter, then every missing prototype.

``python train_library.py --source_domains configs/source_domains.yaml --lora_library_path catseg/loradb
--model_weights models/model_final.pth --embedding_model models/clip-vit-large-patch14 --output_dir
runs/library [--executor local --gpus 0,1,2,3 | --executor slurm --slurm_partition gpu ...] [KEY VALUE ...]``

What it does, per domain of the list:

1. **Adapter.** Skipped when ``<library>/<domain>/`` already holds a complete adapter (PEFT's
   ``adapter_config.json`` and weights: ``run_lora.sh`` writes them last, atomically, so a folder with
   both is a finished run). Otherwise ``sh catseg/run_lora.sh CONFIG NUM_GPUS <output_dir>/<domain>
   MODEL.WEIGHTS ... MODEL.LORA.DB_PATH <library> [KEY VALUE ...] MODEL.LORA.NAME <domain>``, the very
   command a user would type, with the domain's config from the domain table (or ``--config`` with the
   domain's datasets set on top). ``run_lora.sh`` always passes ``--resume``: a run interrupted earlier
   continues from its last checkpoint in ``<output_dir>/<domain>/``.
2. **Prototype.** Then ``generate_embeddings.py`` for the domains whose adapter exists and whose
   ``<domain>_statistics.npz`` does not (it skips existing files itself).

Each job's output goes to ``<output_dir>/<domain>/train_library.log`` (the statistics job:
``<output_dir>/statistics.log``). A failing job is reported with its log and does not stop the others;
the exit status is 0 only when every adapter and prototype exists at the end.

Executors (``submitit``): ``local`` runs the jobs on this machine as a queue, one per GPU of ``--gpus``
at a time (``CUDA_VISIBLE_DEVICES`` set per job), or ``--jobs N`` at a time on CPU; ``slurm`` submits
the adapters as one job array (``--slurm_*`` options, ``--slurm_array_parallelism`` tasks at once) and the
statistics as one job after it, and waits for them. ``--dry_run`` prints the plan (and, for Slurm, the
generated ``sbatch`` script) without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .domains import get_domain, read_domain_list, register_spec_folder
from .executors import (
    CommandTask,
    ExecutorOptions,
    add_executor_flags,
    executor_options,
    log_tail,
    run_tasks,
    sbatch_script,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CATSEG = REPO_ROOT / "catseg"
RUN_LORA = CATSEG / "run_lora.sh"
GENERATE_EMBEDDINGS = REPO_ROOT / "domain_orchestrator" / "generate_embeddings.py"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LOG_NAME = "train_library.log"
STATISTICS_LIST = "<the domains without a prototype>"  # placeholder in the planned command
TRAIN_JOB, STATISTICS_JOB = "semla-library", "semla-statistics"  # Slurm job names

__all__ = ["DomainJob", "LibraryPlan", "adapter_done", "build_parser", "main", "statistics_file"]


class LibraryError(ValueError):
    """A library build that cannot start (bad flags, unknown domain, missing file); the message says which."""


def adapter_done(folder: Path) -> bool:
    """Whether ``folder`` holds a finished adapter (PEFT config and weights, written last by a run)."""
    return (folder / "adapter_config.json").is_file() and any((folder / w).is_file() for w in ADAPTER_WEIGHTS)


def statistics_file(library: Path, domain: str) -> Path:
    """The prototype file ``generate_embeddings.py`` writes for ``domain``."""
    return library / domain / f"{domain}_statistics.npz"


@dataclass
class DomainJob:
    """One adapter to train (or already trained)."""

    name: str
    command: list[str]
    output: Path  # the run's OUTPUT_DIR
    log: Path
    done_before: bool
    resumes: bool  # an interrupted run's checkpoint is there
    status: str = ""
    seconds: float | None = None
    detail: str = ""

    def record(self) -> dict[str, Any]:
        """Iterations reached and the adapter's own validation metric, from the run's files."""
        iterations = None
        metrics = self.output / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry.get("iteration"), int) and "total_loss" in entry:
                    iterations = entry["iteration"] + 1
        values = []
        for path in sorted((self.output / "inference").glob("*/metrics.json")):
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
                values.append(f"{entry['metric']} {float(entry['value']):.2f}")
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return {"iterations": iterations, "val": ", ".join(values)}


@dataclass
class LibraryPlan:
    """What a build does: the adapter jobs (in list order) and the statistics command."""

    domains: list[str]
    library: Path
    output_dir: Path
    jobs: list[DomainJob]
    statistics_command: list[str]
    env: dict[str, str]
    options: ExecutorOptions
    missing_statistics: list[str] = field(default_factory=list)

    @property
    def to_train(self) -> list[DomainJob]:
        return [j for j in self.jobs if not j.done_before]


# -- the command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_library.py",
        description="Train every missing adapter of a domain list with run_lora.sh, then compute every missing "
        "prototype (generate_embeddings.py); locally (a queue over GPUs or CPU jobs) or on Slurm (submitit).",
    )
    p.add_argument("--source_domains", type=Path, required=True, help="YAML list of the library's domains")
    p.add_argument(
        "--lora_library_path", type=Path, required=True, help="the library folder (created if missing)"
    )
    p.add_argument(
        "--output_dir", type=Path, required=True, help="runs, logs and checkpoints: <dir>/<domain>/"
    )
    p.add_argument("--model_weights", required=True, help="the base CAT-Seg checkpoint (MODEL.WEIGHTS)")
    p.add_argument(
        "--embedding_model",
        required=True,
        help="the embedder of the prototypes (generate_embeddings.py's flag)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="one config for every domain, with each domain's DATASETS.TRAIN / TEST set on top "
        "(default: each domain's own config from the domain table)",
    )
    p.add_argument(
        "--config_overlay",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a YAML file merged over every domain's config, in training (train_net.py --config-overlay) and "
        "statistics, e.g. catseg/configs/san/san_vitb16.yaml for a SAN library; repeatable (default: none)",
    )
    p.add_argument(
        "--domain_specs", type=Path, metavar="DIR", help="register the domain specs (*.yaml) of DIR"
    )
    p.add_argument("--datasets_root", type=Path, help="dataset root (default: $DETECTRON2_DATASETS)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device of the runs (default: auto, the trainer's choice)",
    )
    add_executor_flags(p, unit="adapter")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of errors")
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides for every run"
    )
    return p


def make_plan(args: argparse.Namespace) -> LibraryPlan:
    """Check the flags and the domain list and decide every job (nothing is run)."""
    opts = list(args.opts or [])
    if opts and opts[0] == "--":
        opts = opts[1:]
    if len(opts) % 2:
        raise LibraryError(f"config overrides come in KEY VALUE pairs, got an odd number: {' '.join(opts)}")
    keys = opts[::2]
    for reserved in ("MODEL.LORA.NAME", "MODEL.LORA.DB_PATH", "OUTPUT_DIR"):
        if reserved in keys:
            raise LibraryError(f"{reserved} is set per domain by train_library.py; do not pass it")
    if args.config is not None and not args.config.is_file():
        raise LibraryError(f"--config {args.config}: no such file")
    for overlay in args.config_overlay:
        if not overlay.is_file():
            raise LibraryError(f"--config_overlay {overlay}: no such file")
    if not RUN_LORA.is_file():
        raise LibraryError(f"{RUN_LORA}: missing (run from a full checkout)")
    if args.domain_specs is not None:
        register_spec_folder(args.domain_specs)
    domains = read_domain_list(args.source_domains, what="source domains")
    if not domains:
        raise LibraryError(f"{args.source_domains}: the list is empty")

    library = args.lora_library_path.absolute()
    output_dir = args.output_dir.absolute()
    options = executor_options(args)
    num_gpus = options.slurm.gpus_per_job if options.executor == "slurm" else 1
    weights = (
        str(Path(args.model_weights).absolute()) if Path(args.model_weights).exists() else args.model_weights
    )
    jobs = []
    for name in domains:
        domain = get_domain(name)
        output = output_dir / name
        config = args.config.absolute() if args.config is not None else domain.config_file
        datasets = (
            ["DATASETS.TRAIN", f"('{domain.train_dataset}',)", "DATASETS.TEST", f"('{domain.val_dataset}',)"]
            if args.config is not None
            else []
        )
        command = [
            "sh", str(RUN_LORA), str(config), str(num_gpus), str(output),
            "MODEL.WEIGHTS", weights, "MODEL.LORA.DB_PATH", str(library),
            *datasets, *opts, "MODEL.LORA.NAME", name,
        ]  # fmt: skip
        jobs.append(
            DomainJob(
                name=name,
                command=command,
                output=output,
                log=output / LOG_NAME,
                done_before=adapter_done(library / name),
                resumes=(output / "last_checkpoint").is_file(),
            )
        )
    statistics = [
        sys.executable, str(GENERATE_EMBEDDINGS), "--source_domains", STATISTICS_LIST,
        "--lora_library_path", str(library), "--embedding_model", str(args.embedding_model),
        "--device", args.device, "--no_progress", "--model_weights", weights,
    ]  # fmt: skip
    if args.config is not None:  # the catseg embedder is built from the domain config with this on top
        statistics += ["--config_overlay", str(args.config.absolute())]
    for overlay in args.config_overlay:
        statistics += ["--config_overlay", str(overlay.absolute())]
    if args.datasets_root is not None:
        statistics += ["--datasets_root", str(args.datasets_root.absolute())]
    if args.domain_specs is not None:
        statistics += ["--domain_specs", str(args.domain_specs.absolute())]
    env = {"PYTHON": sys.executable}
    if args.datasets_root is not None:
        env["DETECTRON2_DATASETS"] = str(args.datasets_root.absolute())
    train_args = ["--no-progress"] + (["--device", args.device] if args.device != "auto" else [])
    for overlay in args.config_overlay:
        train_args += ["--config-overlay", str(overlay.absolute())]  # TRAIN_NET_ARGS is split on spaces
    env["TRAIN_NET_ARGS"] = " ".join(train_args)
    return LibraryPlan(
        domains=domains,
        library=library,
        output_dir=output_dir,
        jobs=jobs,
        statistics_command=statistics,
        env=env,
        options=options,
        missing_statistics=[d for d in domains if not statistics_file(library, d).is_file()],
    )


# -- the build --------------------------------------------------------------------------------------------


def _table(plan: LibraryPlan) -> str:
    rows = [("domain", "iterations", "time", "val metric (the oracle)", "status")]
    for job in plan.jobs:
        record = job.record()
        if job.seconds is None:
            seconds = ""
        else:
            seconds = f"{job.seconds:.0f} s" if job.seconds < 120 else f"{job.seconds / 60:.1f} min"
        iterations = "" if record["iterations"] is None else str(record["iterations"])
        status = job.status + (f": {job.detail}" if job.detail else "")
        rows.append((job.name, iterations, seconds, record["val"] or "-", status))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * min(max(len(line) for line in lines), len(lines[0]) + 40))
    return "\n".join(lines)


def describe(plan: LibraryPlan) -> str:
    """The plan in words (``--dry_run``): each domain's state and command, the prototypes, the executor."""
    lines = [f"library {plan.library}: {len(plan.domains)} domains, runs in {plan.output_dir}"]
    for job in plan.jobs:
        state = (
            "done, skipped" if job.done_before else ("resumes its checkpoint" if job.resumes else "to train")
        )
        lines.append(f"  {job.name:<24} {state}")
        if not job.done_before:
            lines.append(f"      $ {' '.join(job.command)}")
            lines.append(f"      log: {job.log}")
    lines.append(f"prototypes to compute: {', '.join(plan.missing_statistics) or 'none'}")
    if plan.missing_statistics:
        lines.append(f"      $ {' '.join(plan.statistics_command)}")
    options = plan.options
    if options.executor == "local":
        gpus = [s for s in options.slots if s is not None]
        where = (
            f"GPUs {','.join(gpus)}, one adapter each at a time"
            if gpus
            else f"{len(options.slots)} at a time"
        )
        lines.append(f"executor: local ({where})")
    else:
        count = len(plan.to_train)
        lines.append(f"executor: slurm; the sbatch script of the {count} adapter(s):")
        lines.append(sbatch_script(options.slurm, plan.output_dir, max(count, 1), name=TRAIN_JOB))
    return "\n".join(lines)


def _statistics_task(plan: LibraryPlan) -> CommandTask | None:
    """generate_embeddings.py for the domains with an adapter and no prototype (None: nothing to do)."""
    missing = [
        d
        for d in plan.domains
        if adapter_done(plan.library / d) and not statistics_file(plan.library, d).is_file()
    ]
    if not missing:
        return None
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    domains_file = plan.output_dir / "statistics_domains.yaml"
    domains_file.write_text("".join(f"- {d}\n" for d in missing), encoding="utf-8")
    command = tuple(str(domains_file) if c == STATISTICS_LIST else c for c in plan.statistics_command)
    return CommandTask("statistics", command, plan.output_dir / "statistics.log", plan.env)


def build(plan: LibraryPlan) -> int:
    """Run the plan; print the table; 0 when every adapter and prototype exists at the end."""
    jobs = {job.name: job for job in plan.jobs}
    for job in plan.jobs:
        if job.done_before:
            job.status = "done before"

    def trained(name: str, status: int | None, seconds: float, error: str) -> None:
        job = jobs[name]
        job.seconds = seconds
        if status == 0 and adapter_done(plan.library / name):
            job.status = "trained" + (" (resumed)" if job.resumes else "")
        else:
            job.status = "FAILED"
            reason = log_tail(job.log) or error or f"exit status {status}"
            job.detail = f"{reason} (log: {job.log})"
        print(f"[train_library] {name}: {job.status}{': ' + job.detail if job.detail else ''}", flush=True)

    def prototypes(name: str, status: int | None, seconds: float, error: str) -> None:
        log = plan.output_dir / "statistics.log"
        if status == 0:
            print(f"[train_library] prototypes computed in {seconds:.0f} s (log: {log})", flush=True)
        else:
            print(f"[train_library] prototypes FAILED: {log_tail(log) or error} (log: {log})", flush=True)

    for job in plan.to_train:
        job.output.mkdir(parents=True, exist_ok=True)
    tasks = [CommandTask(job.name, tuple(job.command), job.log, plan.env) for job in plan.to_train]
    run_tasks(tasks, plan.options, plan.output_dir, trained, name=TRAIN_JOB)
    statistics = _statistics_task(plan)
    if statistics is not None:
        options = plan.options
        if options.executor == "slurm":  # one GPU for the embedder, whatever an adapter's job takes
            options = replace(options, slurm=replace(options.slurm, gpus_per_job=1))
        else:
            options = replace(options, slots=options.slots[:1])
        run_tasks([statistics], options, plan.output_dir, prototypes, name=STATISTICS_JOB)
    print(_table(plan), flush=True)
    missing_adapters = [d for d in plan.domains if not adapter_done(plan.library / d)]
    missing_statistics = [d for d in plan.domains if not statistics_file(plan.library, d).is_file()]
    if missing_adapters or missing_statistics:
        print(
            f"train_library.py: not complete: adapters missing for {', '.join(missing_adapters) or 'none'}; "
            f"prototypes missing for {', '.join(missing_statistics) or 'none'}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(
        f"library complete: {len(plan.domains)} adapters with their prototypes in {plan.library}", flush=True
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, plan, run (or print the plan); returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from cat_seg.cli import report_errors

    def body() -> int:
        plan = make_plan(args)
        if args.dry_run:
            print(describe(plan), flush=True)
            return 0
        return build(plan)

    return report_errors("train_library.py", body, debug=args.debug)
