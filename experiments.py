"""SemLA's experiments: zero-shot, oracle, uniform merge and SemLA retrieval + fusion, per target domain.

Examples (from the repository root; relative checkpoint and library paths also resolve against
``catseg/``, the original's working directory)::

    python experiments.py --experiment semla --source_domains configs/source_domains.yaml \\
        --target_domains configs/target_domains.yaml --semla_config configs/semla_config.yaml \\
        --remove_target_adapter --embedding_model /models/clip-vit-large-patch14 --output_dir results/semla
    python experiments.py --experiment zeroshot uniform semla oracle ...      # all four, side by side
    torchrun --nproc_per_node 4 experiments.py --experiment semla ...         # images sharded over processes
    python experiments.py ... --executor slurm --slurm_partition gpu          # one Slurm job per target, collected
    python experiments.py ... --collect                                       # collect the per-target runs again

Exit status: 0 on success, 1 when the run is refused or fails with a clear message (every problem
found before the first image is listed), 2 for a usage error, 130 when interrupted (progress is saved;
``--resume`` continues).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from domain_orchestrator.executors import add_executor_flags  # light: no torch
from domain_orchestrator.settings import EXPERIMENTS  # light: no torch

logger = logging.getLogger("experiments")


def build_parser() -> argparse.ArgumentParser:
    """The command line (the original's flags first, then this project's)."""
    parser = argparse.ArgumentParser(
        prog="experiments.py",
        description="Run SemLA's experiments (zeroshot, oracle, uniform, semla) over lists of target domains.",
    )
    parser.add_argument(
        "--experiment",
        nargs="+",
        required=True,
        choices=EXPERIMENTS,
        metavar="NAME",
        help="one or more of zeroshot, oracle, uniform, semla (several: one pass over the data, a side-by-side table)",
    )
    parser.add_argument(
        "--source_domains",
        type=Path,
        help="YAML list of the library's domains (uniform, semla): names or domain spec files",
    )
    parser.add_argument(
        "--target_domains",
        type=Path,
        required=True,
        help="YAML list of the domains to evaluate (names or domain spec files); each with its own classes",
    )
    parser.add_argument(
        "--domain_specs",
        type=Path,
        metavar="DIR",
        help="register every domain spec (*.yaml) of DIR, so that the lists may name those domains (a list may "
        "also name a spec file directly)",
    )
    parser.add_argument(
        "--semla_config",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="YAML with distance_measure_name (euclidean|cosine), temperature, top_k, combination_type (cat); "
        "several files or a folder of them: one semla-<file stem> column each, in one pass (ablations)",
    )
    parser.add_argument(
        "--output_dir", type=Path, default=Path("results"), help="output folder (default: results)"
    )
    parser.add_argument(
        "--remove_target_adapter",
        action="store_true",
        help="leave each target's own adapter out of uniform and semla (leave-one-out)",
    )
    parser.add_argument(
        "--model_weights",
        default="models/model_final.pth",
        help="CAT-Seg checkpoint; a relative path is looked up in the current folder, then in catseg/ "
        "(default: models/model_final.pth)",
    )
    parser.add_argument(
        "--lora_library_path", default="loradb", help="adapter library folder (same lookup; default: loradb)"
    )
    parser.add_argument(
        "--embedding_model",
        help="image embedder of semla: a local Hugging Face CLIPModel folder (the original: "
        "openai/clip-vit-large-patch14), open_clip:<model>:<checkpoint>, a local open_clip folder, or catseg",
    )
    parser.add_argument("--datasets_root", type=Path, help="dataset root (default: $DETECTRON2_DATASETS)")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)"
    )
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass (default: 1)")
    parser.add_argument(
        "--num_workers", type=int, default=None, help="data-loader workers (default: DATALOADER.NUM_WORKERS)"
    )
    parser.add_argument(
        "--text_features",
        choices=("per_image", "reference"),
        default="per_image",
        help="per_image: class prompts encoded under each image's adapters (default); reference: under the "
        "first image's adapters of each target, reused for the others (the original code)",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation (TEST.AUG.ENABLED True): each image predicted at the TEST.AUG.MIN_SIZES "
        "scales and their flips, probabilities averaged; SemLA weights and text features once per image",
    )
    parser.add_argument(
        "--config_overlay",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="YAML merged over every domain's config (repeatable), e.g. catseg/configs/tiny/tiny_model.yaml",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --output_dir")
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in an --output_dir holding a run"
    )
    parser.add_argument(
        "--save_every",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="save the resume state inside a target this often (default: 180; 0: after every batch)",
    )
    parser.add_argument(
        "--num_processes",
        type=int,
        default=1,
        help="processes to start, each evaluating a shard of the images (GPUs with --device cuda; CPU "
        "processes over gloo with --device cpu); torchrun works too (default: 1)",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    add_executor_flags(  # without --executor: every target in this process, as always
        parser,
        unit="target",
        default=None,
        executor_help="split the run into one job per target: local (a queue on this machine) or slurm (a job "
        "array); the outputs go to OUTPUT_DIR/targets/<target>/ and are collected when every job has succeeded "
        "(default: none, every target in this process)",
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="merge the per-target runs of OUTPUT_DIR/targets/ into the run's files (what --executor does "
        "at the end), e.g. after rerunning a failed target",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="KEY VALUE",
        help="config overrides applied to every domain's config, e.g. DATALOADER.NUM_WORKERS 0",
    )
    return parser


def _worker(info, plan, debug: bool) -> None:  # noqa: ANN001 - DistInfo, ExperimentPlan (imported lazily)
    """One process: run the plan. With several processes, a user error is printed once (rank 0) and the
    process exits with status 1; alone, the error goes up to :func:`main`, which prints it."""
    from cat_seg.cli import USER_ERRORS, error_message
    from cat_seg.engine.setup import logging_to
    from domain_orchestrator.orchestrator import run

    with logging_to(None, rank=info.rank):
        try:
            run(plan, info)
        except USER_ERRORS as e:
            if debug or info.world_size == 1:
                raise
            if info.is_main:
                print(f"experiments.py: error: {error_message(e)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check everything, run (in one or several processes); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from cat_seg.cli import report_errors

    return report_errors("experiments.py", lambda: _main(args, argv), debug=args.debug)


def _semla_configs(given: list[Path] | None) -> dict[str, object]:
    """One ``--semla_config`` file: the ``semla`` column; several files or a folder: one column each."""
    if not given:
        return {"semla_config": None}
    if len(given) == 1 and not given[0].is_dir():
        return {"semla_config": given[0]}
    files: list[Path] = []
    for path in given:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            if not found:
                raise FileNotFoundError(f"--semla_config {path}: no *.yaml file in this folder")
            files += found
        else:
            files.append(path)
    return {"semla_config": None, "semla_configs": tuple(p.absolute() for p in files)}


#: The flags of :func:`add_executor_flags` (they choose where a run's jobs go, not what a run computes).
_EXECUTOR_FLAGS = {
    "executor",
    "gpus",
    "jobs",
    "slurm_partition",
    "slurm_time",
    "slurm_gpus_per_job",
    "slurm_cpus_per_gpu",
    "slurm_array_parallelism",
    "slurm_account",
    "slurm_qos",
    "dry_run",
}


def _check_executor_flags(args: argparse.Namespace) -> None:
    """Executor flags need ``--executor``; ``--collect`` takes none of them."""
    parser = build_parser()
    given = sorted(f for f in _EXECUTOR_FLAGS if getattr(args, f) != parser.get_default(f))
    if args.collect and given:
        raise ValueError(f"--collect only collects; leave out --{', --'.join(given)}")
    if args.executor is None and given:
        raise ValueError(f"--{given[0]} is an option of split runs: add --executor local or --executor slurm")


def _dataset_root(args: argparse.Namespace) -> Path | None:
    if args.datasets_root is None and os.environ.get("DETECTRON2_DATASETS"):
        return Path(os.environ["DETECTRON2_DATASETS"])
    return args.datasets_root


def _settings(args: argparse.Namespace, argv: list[str]):  # noqa: ANN202 - ExperimentSettings (lazy import)
    from domain_orchestrator.orchestrator import ExperimentSettings

    return ExperimentSettings(
        experiments=tuple(args.experiment),
        source_domains=args.source_domains,
        target_domains=args.target_domains,
        domain_specs=args.domain_specs,
        output_dir=args.output_dir.absolute(),
        model_weights=args.model_weights,
        lora_library_path=args.lora_library_path,
        **_semla_configs(args.semla_config),
        remove_target_adapter=args.remove_target_adapter,
        embedding_model=args.embedding_model,
        datasets_root=_dataset_root(args),
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        text_features=args.text_features,
        config_overlays=tuple(p.absolute() for p in args.config_overlay),
        # --tta is the override TEST.AUG.ENABLED True, first, so that the user's KEY VALUE pairs come after it
        opts=(*(("TEST.AUG.ENABLED", "True") if args.tta else ()), *(args.opts or ())),
        resume=args.resume,
        overwrite=args.overwrite,
        save_every=args.save_every,
        progress=not args.no_progress,
        argv=tuple(argv),
    )


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    from cat_seg.engine.launch import launch, torchrun_world
    from cat_seg.engine.setup import device_type, logging_to
    from domain_orchestrator.orchestrator import prepare

    _check_executor_flags(args)
    if args.num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {args.num_processes}")
    if args.collect:
        return _collect(args, argv)
    torchrun = torchrun_world()
    if args.executor is not None:
        if torchrun is not None:
            raise ValueError("--executor starts its own jobs: run it without torchrun (use --num_processes)")
        return _split(args, argv)
    world = torchrun.world_size if torchrun is not None else args.num_processes
    settings = _settings(args, argv)
    with logging_to(None, rank=torchrun.rank if torchrun is not None else 0):
        plan = prepare(settings, world_size=world)
    import torch.multiprocessing as mp

    try:
        launch(
            _worker,
            num_processes=args.num_processes,
            device_type=device_type(args.device),
            args=(plan, args.debug),
        )
    except mp.ProcessExitedException:  # a spawned process failed; it printed why
        return 1
    return 0


# -- one job per target (--executor), and --collect ----------------------------------------------------------


def _run_argv(argv: list[str], args: argparse.Namespace) -> list[str]:
    """The command line of the whole run as a single run would record it: without the executor flags and
    ``--collect``."""
    from domain_orchestrator import split

    kept, overrides = split.without_flags(
        build_parser(), argv, args.opts or [], _EXECUTOR_FLAGS | {"collect"}
    )
    return [*kept, *overrides]


def _columns(args: argparse.Namespace) -> list[str]:
    """The experiment columns the command line asks for (``semla`` as its ablation columns, if several)."""
    from domain_orchestrator.plan import experiment_columns
    from domain_orchestrator.settings import semla_column

    paths = _semla_configs(args.semla_config).get("semla_configs", ())
    return experiment_columns(args.experiment, {semla_column(p): None for p in paths})


def _collect(args: argparse.Namespace, argv: list[str]) -> int:
    from domain_orchestrator import split
    from domain_orchestrator.domains import read_domain_list, register_spec_folder
    from domain_orchestrator.reporting import format_summary

    if args.domain_specs is not None:
        register_spec_folder(args.domain_specs)
    targets = read_domain_list(args.target_domains, what="target domains")
    output_dir = args.output_dir.absolute()
    book = split.collect(output_dir, targets, argv=_run_argv(argv, args), columns=_columns(args))
    print(format_summary(book), flush=True)
    print(f"results collected from {output_dir / split.TARGETS_DIR} into {output_dir}", flush=True)
    return 0


def _split(args: argparse.Namespace, argv: list[str]) -> int:
    """One job per target through the executor, then the collect step."""
    from cat_seg.engine.setup import logging_to
    from domain_orchestrator import split
    from domain_orchestrator.executors import executor_options
    from domain_orchestrator.orchestrator import prepare
    from domain_orchestrator.reporting import format_summary

    options = executor_options(args)
    if options.executor == "local" and any(options.slots) and args.num_processes > 1:
        raise ValueError(
            "--gpus gives each job one GPU; --num_processes > 1 needs --executor slurm with "
            "--slurm_gpus_per_job (or one job on several GPUs: run without --executor)"
        )
    settings = _settings(args, argv)
    with logging_to(None):  # everything checked once, before any job starts
        plan = prepare(settings, world_size=args.num_processes)
    output_dir = plan.output_dir
    if not (args.resume or args.overwrite):
        split.refuse_earlier_runs(output_dir, [t.name for t in plan.targets])
    kept, overrides = split.without_flags(
        build_parser(), argv, args.opts or [], _EXECUTOR_FLAGS | {"target_domains", "output_dir"}
    )
    script = Path(__file__).resolve()
    jobs = split.plan_jobs(plan, kept, overrides, script=script, cwd=Path.cwd(), root=script.parent)
    if args.dry_run:
        print(split.describe(jobs, options, output_dir, target_list=args.target_domains), flush=True)
        return 0
    failed = split.run_jobs(jobs, options, output_dir)
    if failed:
        print(
            f"experiments.py: {len(failed)} of {len(jobs)} target(s) failed: {', '.join(failed)} (logs: "
            f"{output_dir / split.TARGETS_DIR}/<target>/{split.LOG_FILE}); nothing collected. Run the same command "
            "with --resume to run only the unfinished targets again and collect",
            file=sys.stderr,
            flush=True,
        )
        return 1
    book = split.collect(
        output_dir,
        [t.name for t in plan.targets],
        argv=_run_argv(argv, args),
        columns=plan.experiments,
        fingerprint=plan.fingerprint,
    )
    print(format_summary(book), flush=True)
    print(f"results collected from {output_dir / split.TARGETS_DIR} into {output_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
