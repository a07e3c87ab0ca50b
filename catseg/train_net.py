"""Train or evaluate CAT-Seg and SemLA LoRA adapters (the original's ``catseg/train_net.py``, without detectron2).

Examples (from the repository root; ``run_lora.sh`` / ``eval_lora.sh`` build these commands)::

    python catseg/train_net.py --config-file catseg/configs/acdc/rain/lora-rain-acdc.yaml --num-gpus 1 \\
        --resume OUTPUT_DIR output/acdc-rain TEST.SLIDING_WINDOW True MODEL.SEM_SEG_HEAD.POOLING_SIZES [1,1] \\
        MODEL.WEIGHTS models/model_final.pth MODEL.LORA.ENABLED True MODEL.LORA.NAME acdc-rain
    python catseg/train_net.py --config-file ... --eval-only OUTPUT_DIR output/acdc-rain/eval ...

A domain spec (``cat_seg.data.domain_spec``) may be given as ``--config-file``: its base config with its
datasets and classes (``sh run_lora.sh floods.yaml 1 output/floods MODEL.LORA.NAME floods``).

Paths: a relative ``--config-file`` is taken relative to the current directory, then to ``catseg/``;
``OUTPUT_DIR`` is relative to the current directory; ``MODEL.WEIGHTS`` and ``MODEL.LORA.DB_PATH`` are
relative to ``catseg/`` (the original's working directory). Datasets are read from ``--data-root`` or
``$DETECTRON2_DATASETS``. Exit status: 0 on success, 1 when the run is refused (bad config, missing data
or checkpoint, existing adapter, ...), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from torch.multiprocessing import ProcessExitedException

from cat_seg.cli import USER_ERRORS, error_message, report_errors
from cat_seg.config import CATSEG_ROOT, CfgNode, load_config
from cat_seg.data import default_root, get_dataset
from cat_seg.data.registry import domain_spec
from cat_seg.engine.evaluate import format_results_table
from cat_seg.engine.launch import DistInfo, launch
from cat_seg.engine.run import RunOptions, RunPlan, prepare_run, resolve_run_paths, run
from cat_seg.engine.setup import device_type, logging_to

logger = logging.getLogger("train_net")


def device_arg(value: str) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (availability is checked later)."""
    kind, _, index = value.partition(":")
    if value in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and index.isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"invalid device {value!r}: use auto, cpu, cuda, cuda:N or mps")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (detectron2's ``default_argument_parser`` flags plus a few of ours)."""
    parser = argparse.ArgumentParser(
        description="Train or evaluate CAT-Seg or SAN models and SemLA LoRA adapters.",
    )
    parser.add_argument(
        "--config-file", "--config", required=True, metavar="FILE", help="YAML config (--config also works)"
    )
    parser.add_argument(
        "--config-overlay",
        action="append",
        default=[],
        metavar="FILE",
        help="a YAML file merged over the config before the KEY VALUE overrides, e.g. another model "
        "family's keys (catseg/configs/san/san_vitb16.yaml); repeatable (default: none)",
    )
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="processes to run, one per GPU (or CPU processes with --device cpu); default 1",
    )
    parser.add_argument(
        "--num-machines", type=int, default=1, help="only 1; use torchrun for several machines (default: 1)"
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate DATASETS.TEST, no training")
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT_DIR/last_checkpoint if present"
    )
    parser.add_argument(
        "--device",
        type=device_arg,
        default=None,
        help="auto, cpu, cuda, cuda:N or mps (default: MODEL.DEVICE of the config)",
    )
    parser.add_argument(
        "--dist-url",
        default="auto",
        help="rendezvous URL of spawned processes (default: auto, a free port)",
    )
    parser.add_argument(
        "--data-root", type=Path, default=None, help="dataset root (default: $DETECTRON2_DATASETS)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing adapter folder DB_PATH/NAME, or start over in an OUTPUT_DIR holding checkpoints",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (also off when not a TTY)"
    )
    parser.add_argument(
        "--log-period",
        type=int,
        default=20,
        help="iterations between log lines and metric records; default 20",
    )
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=1,
        help=(
            "images per forward pass at evaluation; default 1, as the original. Sliding-window results do not "
            "depend on it; without TEST.SLIDING_WINDOW, images of different sizes are padded together, which "
            "changes their predictions"
        ),
    )
    parser.add_argument(
        "--no-data-check",
        action="store_true",
        help="skip opening every image and label before the run (the check finds corrupt files up front)",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="KEY VALUE",
        help="config overrides, e.g. SOLVER.MAX_ITER 100 MODEL.LORA.NAME acdc-rain",
    )
    return parser


def _config_path(given: str) -> Path:
    """``given`` relative to the current directory, else relative to ``catseg/`` (original-style paths)."""
    path = Path(given).expanduser()
    if path.is_absolute() or path.exists():
        return path
    fallback = CATSEG_ROOT / path
    if fallback.exists():
        logger.info("config %s not found in the current directory; using %s", given, fallback)
        return fallback
    raise FileNotFoundError(f"config file {given} not found (looked in {Path.cwd()} and {CATSEG_ROOT})")


def _default_root(cfg: CfgNode) -> Path:
    """``$DETECTRON2_DATASETS``; not needed when every dataset of the run is a domain spec's (they say where)."""
    try:
        return default_root()
    except ValueError:
        names = [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]
        try:
            own = bool(names) and all(domain_spec(get_dataset(n).domain) is not None for n in names)
        except KeyError:  # an unknown dataset: that is the error to report first (prepare_run names it)
            own = True
        if not own:
            raise
        return Path.cwd()


def plan_from_args(args: argparse.Namespace, argv: Sequence[str] = ()) -> RunPlan:
    """Config, options and checks of a run (nothing is written).

    Raises:
        ValueError, FileNotFoundError, FileExistsError, KeyError: the run is refused (message says why).
    """
    if args.num_machines != 1:
        raise ValueError("--num-machines must be 1; start train_net.py with torchrun on each machine instead")
    if args.num_gpus < 1:
        raise ValueError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    overlays = [_config_path(given) for given in args.config_overlay]
    cfg = load_config(_config_path(args.config_file), list(args.opts or []), overlays=overlays)
    cfg = resolve_run_paths(cfg, cwd=Path.cwd())
    data_root = args.data_root if args.data_root is not None else _default_root(cfg)
    options = RunOptions(
        eval_only=args.eval_only,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device or cfg.MODEL.DEVICE,
        num_processes=args.num_gpus,
        dist_url=args.dist_url,
        progress=not args.no_progress and sys.stderr.isatty(),
        log_period=args.log_period,
        eval_batch_size=args.eval_batch_size,
        check_data=not args.no_data_check,
        argv=tuple(argv),
    )
    return prepare_run(cfg, options, data_root)


def _worker(info: DistInfo, plan: RunPlan, debug: bool = False) -> None:
    """One process of the run: log to OUTPUT_DIR/log.txt (rank 0), run, print the results table.

    With several processes, a user error (bad data file, ...) is printed by the process that met it, which
    exits with status 1; in a single process it goes up to :func:`main`, which prints it.
    """
    with logging_to(plan.output_dir, rank=info.rank):
        try:
            outcome = run(plan, info)
        except USER_ERRORS as e:
            logger.debug("run stopped: %s", error_message(e))  # log.txt only (DEBUG is not shown)
            if debug or info.world_size == 1:
                raise
            where = "" if info.is_main else f"[rank {info.rank}] "
            print(f"train_net.py: error: {where}{error_message(e)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        if info.is_main and outcome.results:
            print(format_results_table(outcome.results), flush=True)
        if info.is_main and outcome.adapter is not None:
            print(f"adapter saved to {outcome.adapter}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), check the run, launch it; returns the exit status.

    Errors with a clear message (a refused run, a corrupt dataset file met during training, ...) are
    printed as one line (``--debug``: with the traceback) and give status 1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    def body() -> int:
        with logging_to(None):
            plan = plan_from_args(args, argv)
        try:
            launch(
                _worker,
                num_processes=plan.options.num_processes,
                device_type=device_type(plan.options.device),
                dist_url=plan.options.dist_url,
                args=(plan, args.debug),
            )
        except ProcessExitedException:  # a spawned process stopped on an error it logged
            print("train_net.py: error: a process of the run stopped; see its message above", file=sys.stderr)
            return 1
        return 0

    return report_errors("train_net.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
