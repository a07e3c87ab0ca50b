"""One ``train_net`` run: every check before anything is written (:func:`prepare_run`), then the flow of
each process (:func:`run`).

Flows (as in the original SemLA code):

- LoRA training (``MODEL.LORA.ENABLED True``): build CAT-Seg, load ``MODEL.WEIGHTS``, attach a new
  adapter, train only the LoRA factors, save the adapter to ``DB_PATH/NAME/``, evaluate ``DATASETS.TEST``.
- LoRA evaluation (``--eval-only``): build, load the base weights, load ``DB_PATH/NAME``, evaluate; with
  ``TEST.AUG.ENABLED`` evaluate again with test-time augmentation (results ``<dataset>_TTA``, files in
  ``inference_TTA/``), as the original's ``Trainer.test_with_TTA``.
- Plain CAT-Seg fine-tuning / evaluation (LoRA disabled): the same without the adapter; the trainable
  CLIP parameters follow ``MODEL.SEM_SEG_HEAD.CLIP_FINETUNE``.

:func:`prepare_run` raises, naming the file or key, for: a dataset that is unknown or has no usable data
under the root, a class list that does not match a dataset, a missing base checkpoint, LoRA target
modules the model lacks, an existing adapter folder (unless resuming that adapter's run or
overwriting), an output folder holding another run, a checkpoint of the wrong kind (LoRA vs full model),
and invalid solver settings. It reads but never writes, so a refused run changes nothing on disk.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..config import CfgNode, dump_config, lora_target_modules, resolve_catseg_path
from ..data import DatasetError, UnknownDatasetError, get_dataset, load_records, mapper_from_cfg
from ..data.build import build_train_loader
from ..data.io import check_files
from ..lora import resolve_target_modules
from ..modeling import build_model
from ..modeling.text import load_class_names
from ..test_time_augmentation import TTASettings
from .checkpoint import (
    LAST_CHECKPOINT,
    ResumeError,
    check_resume_compatible,
    load_training_checkpoint,
    read_last_checkpoint,
)
from .evaluate import check_vocabulary, copypaste_lines, evaluate_datasets, unwrap_model
from .launch import DistInfo, all_gather_objects, barrier, torchrun_world
from .lora import (
    adapter_dir,
    attach_lora,
    check_adapter_targets,
    load_adapter,
    save_adapter,
    state_digest,
    trainable_state_dict,
    validate_adapter_name,
)
from .optim import build_gradient_clipper, build_optimizer
from .schedule import build_lr_schedule, build_lr_scheduler
from .setup import collect_run_info, device_type, pick_seed, resolve_device, seed_everything, write_run_info
from .train import MetricsLog, Trainer

logger = logging.getLogger(__name__)

__all__ = ["RunOptions", "RunOutcome", "RunPlan", "lora_signature", "prepare_run", "resolve_run_paths", "run"]

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class RunOptions:
    """Command-line choices of a run (everything else is in the config).

    Attributes:
        eval_only: evaluate only (``--eval-only``).
        resume: continue from ``OUTPUT_DIR/last_checkpoint`` when there is one (``--resume``).
        overwrite: allow replacing an existing adapter folder, or starting over in an output folder that
            holds another run's checkpoints (``--overwrite``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        num_processes: processes of the run (``--num-gpus``; under torchrun, its world size).
        dist_url: rendezvous of spawned processes (``auto`` = a free local port).
        progress: show a progress bar on rank 0.
        log_period: iterations between log lines and metric records.
        eval_batch_size: images per forward pass at evaluation (the original: 1).
        check_data: open every image and label of the run's datasets before anything runs (a corrupt
            file is found before the first step, not at iteration N).
        argv: the command-line arguments, recorded in ``run_info.json``.
    """

    eval_only: bool = False
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    num_processes: int = 1
    dist_url: str = "auto"
    progress: bool = False
    log_period: int = 20
    eval_batch_size: int = 1
    check_data: bool = True
    argv: tuple[str, ...] = ()


@dataclass
class RunPlan:
    """A checked run, ready to launch (picklable: it is sent to spawned processes).

    Attributes:
        cfg: the resolved, frozen config (absolute ``OUTPUT_DIR``, ``MODEL.WEIGHTS``, ``MODEL.LORA.DB_PATH``).
        options: the command-line choices.
        data_root: the dataset root.
        seed: the seed of the run (the checkpoint's when resuming; picked when ``SEED`` < 0).
        lora: the adapter's signature (name, r, alpha, target modules, ...) or None for a full-model run.
        resume_from: the checkpoint to continue from, or None.
        start_over: training starts fresh in an output folder whose ``last_checkpoint`` is discarded.
        train_records: records of ``DATASETS.TRAIN`` (empty for ``--eval-only``).
        test_records: records of each ``DATASETS.TEST`` dataset.
    """

    cfg: CfgNode
    options: RunOptions
    data_root: Path
    seed: int
    lora: dict[str, Any] | None = None
    resume_from: Path | None = None
    start_over: bool = False
    train_records: list[dict[str, Any]] = field(default_factory=list)
    test_records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.OUTPUT_DIR)

    @property
    def weights(self) -> Path | None:
        return Path(self.cfg.MODEL.WEIGHTS) if self.cfg.MODEL.WEIGHTS else None

    @property
    def adapter_dir(self) -> Path | None:
        return adapter_dir(self.cfg.MODEL.LORA.DB_PATH, self.cfg.MODEL.LORA.NAME) if self.lora else None


@dataclass
class RunOutcome:
    """What :func:`run` leaves: the model (unwrapped from DDP), the evaluation results, the adapter folder."""

    model: nn.Module
    results: dict[str, dict[str, dict[str, float | int]]]
    adapter: Path | None = None
    iteration: int | None = None


# ------------------------------------------------------------------------------------------------------
# Checks (no writes)
# ------------------------------------------------------------------------------------------------------


def resolve_run_paths(cfg: CfgNode, *, cwd: str | os.PathLike[str]) -> CfgNode:
    """Make the run's paths absolute, without looking at the process's current directory.

    ``OUTPUT_DIR`` is a command-line path: relative to ``cwd`` (the caller's directory). ``MODEL.WEIGHTS``
    and ``MODEL.LORA.DB_PATH`` are the original's paths (``models/model_final.pth``, ``loradb/``): relative to
    the ``catseg/`` folder, the original's working directory.

    Returns:
        a frozen copy of ``cfg``.
    """
    out = cfg.clone()
    out.defrost()
    output = Path(cfg.OUTPUT_DIR).expanduser()
    out.OUTPUT_DIR = os.path.abspath(output if output.is_absolute() else Path(cwd) / output)
    if cfg.MODEL.WEIGHTS:
        out.MODEL.WEIGHTS = str(resolve_catseg_path(cfg.MODEL.WEIGHTS))
    out.MODEL.LORA.DB_PATH = str(resolve_catseg_path(cfg.MODEL.LORA.DB_PATH))
    out.freeze()
    return out


def lora_signature(cfg: CfgNode, target_modules: list[str]) -> dict[str, Any]:
    """What a LoRA checkpoint must share with the run that resumes it.

    ``reference_training`` is present only when ``MODEL.LORA.REFERENCE_TRAINING`` is True, so that
    checkpoints written before that switch existed still resume default-mode runs.
    """
    lora = cfg.MODEL.LORA
    signature = {
        "name": lora.NAME,
        "r": int(lora.RANK),
        "lora_alpha": lora.ALPHA,
        "bias": lora.BIAS,
        "use_rslora": bool(lora.USE_RSLORA),
        "use_dora": bool(lora.USE_DORA),
        "target_modules": list(target_modules),
    }
    if lora.REFERENCE_TRAINING:
        signature["reference_training"] = True
    return signature


def _load_datasets(
    cfg: CfgNode, key: str, root: Path, class_json_key: str
) -> dict[str, list[dict[str, Any]]]:
    """Records of each dataset named by ``key`` (``DATASETS.TRAIN``/``TEST``), checked against the class JSON."""
    class_json = getattr(cfg.MODEL.SEM_SEG_HEAD, class_json_key)
    class_names = load_class_names(resolve_catseg_path(class_json))
    out: dict[str, list[dict[str, Any]]] = {}
    for name in cfg.DATASETS[key.split(".")[1]]:
        try:
            get_dataset(name)
        except UnknownDatasetError as e:
            raise ValueError(f"{key}: {e}") from None
        check_vocabulary(class_names, name, source=f"MODEL.SEM_SEG_HEAD.{class_json_key} ({class_json})")
        try:
            records = load_records(name, root)
        except DatasetError as e:
            raise type(e)(f"{key} names {name!r}, which has no usable data under {root}: {e}") from None
        if not records:
            raise DatasetError(f"{key} names {name!r}, which has no images under {root}")
        out[name] = records
        logger.info("%s: %s has %d images", key, name, len(records))
    return out


def _check_files(records: list[dict[str, Any]]) -> None:
    """Every image and label of the run opens and is intact (PNG checksums), or one error lists them."""
    start = time.perf_counter()
    problems = check_files(records)
    if problems:
        more = " (and possibly more)" if len(problems) >= 20 else ""
        raise DatasetError(
            f"{len(problems)} dataset file(s) cannot be used{more}; fix or replace them (--no-data-check skips "
            "this check):\n" + "\n".join(f"  {p}" for p in problems)
        )
    logger.info("checked %d records' files in %.1f s", len(records), time.perf_counter() - start)


def _check_weights(cfg: CfgNode, *, required: bool) -> None:
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        if required:
            raise ValueError(
                "MODEL.WEIGHTS is empty: this run needs a CAT-Seg checkpoint (e.g. models/model_final.pth)"
            )
        logger.warning("MODEL.WEIGHTS is empty: the model starts from random weights")
        return
    if not Path(weights).is_file():
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights}: checkpoint file not found")


def _world_size(options: RunOptions) -> int:
    info = torchrun_world()
    return info.world_size if info is not None else options.num_processes


def prepare_run(cfg: CfgNode, options: RunOptions, data_root: str | os.PathLike[str]) -> RunPlan:
    """Check everything a run needs and load the dataset records; write nothing.

    Args:
        cfg: the config after :func:`resolve_run_paths`.
        options: the command-line choices.
        data_root: the dataset root (``--data-root`` / ``$DETECTRON2_DATASETS``).
    Returns:
        the plan to pass to :func:`run` in every process.
    Raises:
        ValueError, FileNotFoundError, FileExistsError (and their subclasses): naming the file or key.
    """
    root = Path(data_root).expanduser()
    kind = device_type(options.device)
    world = _world_size(options)
    if kind == "cuda" and world > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {world} but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist (--data-root or $DETECTRON2_DATASETS)")
    if options.eval_batch_size < 1:
        raise ValueError(f"--eval-batch-size must be >= 1, got {options.eval_batch_size}")
    mapper_from_cfg(cfg, is_train=False)  # INPUT.* errors now, not after training
    TTASettings.from_cfg(cfg)  # TEST.AUG.* errors now (load_config checks them too)
    if cfg.TEST.AUG.ENABLED and not options.eval_only:
        logger.warning(
            "TEST.AUG.ENABLED: test-time augmentation applies to --eval-only runs (as in the original); "
            "the evaluations of this training run use the plain single view"
        )
    shapes_only = build_model(cfg, "meta", class_names=False)  # architecture errors now (no memory used)
    training = not options.eval_only
    if training:
        mapper_from_cfg(cfg, is_train=True)
        build_lr_schedule(cfg)
        build_gradient_clipper(cfg)
        if cfg.SOLVER.OPTIMIZER not in ("ADAMW", "SGD"):
            raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got {cfg.SOLVER.OPTIMIZER!r}")
        if cfg.SOLVER.IMS_PER_BATCH < world or cfg.SOLVER.IMS_PER_BATCH % world:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} must be a multiple of the {world} processes"
            )
        if not cfg.DATASETS.TRAIN:
            raise ValueError("DATASETS.TRAIN is empty: nothing to train on")
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            raise ValueError(
                f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported; use 'TrainingSampler'"
            )
    elif not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: nothing to evaluate")

    lora_enabled = bool(cfg.MODEL.LORA.ENABLED)
    if cfg.MODEL.LORA.REFERENCE_TRAINING and not lora_enabled and not options.eval_only:
        raise ValueError(
            "MODEL.LORA.REFERENCE_TRAINING True reproduces the original LoRA trainer; it needs "
            "MODEL.LORA.ENABLED True (run_lora.sh sets it)"
        )
    _check_weights(cfg, required=lora_enabled or options.eval_only)
    lora = None
    if lora_enabled:
        name = validate_adapter_name(cfg.MODEL.LORA.NAME)
        lora = lora_signature(cfg, resolve_target_modules(lora_target_modules(cfg), shapes_only))
        if options.eval_only:
            check_adapter_targets(adapter_dir(cfg.MODEL.LORA.DB_PATH, name), shapes_only)

    test_records = _load_datasets(cfg, "DATASETS.TEST", root, "TEST_CLASS_JSON")
    if not cfg.DATASETS.TEST:
        logger.warning("DATASETS.TEST is empty: the run will not be evaluated")
    seed = pick_seed(int(cfg.SEED))
    output_dir = Path(cfg.OUTPUT_DIR)
    if options.eval_only:
        if options.check_data:
            _check_files([r for records in test_records.values() for r in records])
        if (output_dir / LAST_CHECKPOINT).exists():
            raise FileExistsError(
                f"OUTPUT_DIR {output_dir} holds a training run, whose config.yaml and run_info.json an evaluation "
                f"would replace; evaluate into another folder (eval_lora.sh uses {output_dir / 'eval'})"
            )
        return RunPlan(
            cfg=cfg, options=options, data_root=root, seed=seed, lora=lora, test_records=test_records
        )

    train_records = [
        r
        for records in _load_datasets(cfg, "DATASETS.TRAIN", root, "TRAIN_CLASS_JSON").values()
        for r in records
    ]
    if options.check_data:
        _check_files(train_records + [r for records in test_records.values() for r in records])
    resume_from, start_over = None, False
    last = read_last_checkpoint(output_dir)
    if last is not None:
        if options.resume:
            payload = load_training_checkpoint(last, mmap=True)
            check_resume_compatible(payload, last, lora)
            resume_from, seed = last, int(payload["seed"])
            logger.info("will resume from %s at iteration %d", last, int(payload["iteration"]) + 1)
        elif options.overwrite:
            start_over = True
        else:
            raise FileExistsError(
                f"OUTPUT_DIR {output_dir} already holds a training run ({output_dir / LAST_CHECKPOINT} -> "
                f"{last.name}); pass --resume to continue it or --overwrite to start over"
            )
    if lora is not None:
        folder = adapter_dir(cfg.MODEL.LORA.DB_PATH, lora["name"])
        if folder.exists() and resume_from is None and not options.overwrite:
            raise FileExistsError(
                f"adapter folder {folder} already exists (MODEL.LORA.DB_PATH / MODEL.LORA.NAME); choose another "
                "MODEL.LORA.NAME or DB_PATH, or pass --overwrite to replace it (OVERWRITE=1 with run_lora.sh)"
            )
    return RunPlan(
        cfg=cfg,
        options=options,
        data_root=root,
        seed=seed,
        lora=lora,
        resume_from=resume_from,
        start_over=start_over,
        train_records=train_records,
        test_records=test_records,
    )


# ------------------------------------------------------------------------------------------------------
# The per-process flow
# ------------------------------------------------------------------------------------------------------


def _configure_torch(device: torch.device, world_size: int) -> None:
    """Process-wide torch flags of a run (set by the run's entry point only)."""
    if device.type == "cpu" and world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        # No oversubscription; an explicit OMP_NUM_THREADS wins (a run that must give the same bytes on
        # any machine pins it: CPU kernels' results can depend on the thread count).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if device.type == "cuda":
        # As the original's set_random_seed and main(): deterministic cuDNN, TF32 matmuls.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.set_float32_matmul_precision("high")


def _evaluate(
    plan: RunPlan,
    model: nn.Module,
    metrics: MetricsLog,
    iteration: int | None,
    *,
    tta: TTASettings | None = None,
) -> dict[str, Any]:
    """Evaluate ``DATASETS.TEST``; with ``tta`` a second time with test-time augmentation, whose results are
    added as ``<dataset>_TTA`` (the original's ``test_with_TTA`` naming)."""
    if not plan.cfg.DATASETS.TEST:
        return {}
    common = {
        "records": plan.test_records,
        "output_dir": plan.output_dir,
        "batch_size": plan.options.eval_batch_size,
        "extra": {"iteration": iteration} if iteration is not None else None,
    }
    results = evaluate_datasets(plan.cfg, model, **common)
    if tta is not None:
        logger.info("running inference with test-time augmentation (%s)", tta.describe())
        augmented = evaluate_datasets(plan.cfg, model, **common, tta=tta)
        results.update({f"{name}_TTA": result for name, result in augmented.items()})
    metrics.write(
        {
            "event": "evaluation",
            "iteration": iteration,
            "results": {k: v["sem_seg"] for k, v in results.items()},
        }
    )
    for line in copypaste_lines(results):
        logger.info(line)
    return results


def _training_record(catseg: nn.Module) -> dict[str, Any]:
    """``semla_training.json`` of an adapter trained with ``MODEL.LORA.REFERENCE_TRAINING``."""
    return {
        "reference_training": True,
        "description": "trained as the original SemLA trainer: LoRA on the CLIP attention q/k/v projections "
        "inert (B zero), both guidance features from the first guidance block during training; evaluate "
        "with the configured guidance blocks",
        "train_guidance_layers": list(catseg.train_guidance_layers),
        "guidance_layers": list(catseg.guidance_layers),
    }


def _load_model_state(model: nn.Module, state: dict[str, torch.Tensor], *, lora: bool, source: Path) -> None:
    """Restore the model part of a checkpoint: the trainable (LoRA) tensors, or the whole state dict."""
    if not lora:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ResumeError(f"{source}: does not fit the model: {e}") from None
        return
    params = trainable_state_dict(model)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ResumeError(
            f"{source}: LoRA tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _resume(
    plan: RunPlan, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
) -> tuple[int, int]:
    """Load ``plan.resume_from`` into the run's objects; returns (start iteration, sampler position)."""
    path = plan.resume_from
    assert path is not None
    payload = load_training_checkpoint(path)
    check_resume_compatible(payload, path, plan.lora)
    _load_model_state(model, payload["model"], lora=plan.lora is not None, source=path)
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except ValueError as e:
        raise ResumeError(f"{path}: optimizer state does not fit this run's parameter groups ({e})") from None
    scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("grad_scaler"):
        scaler.load_state_dict(payload["grad_scaler"])
    torch.set_rng_state(payload["torch_rng"])
    start_iter = int(payload["iteration"]) + 1
    logger.info("resumed from %s: continuing at iteration %d", path, start_iter)
    return start_iter, int(payload["next_draw"])


def run(plan: RunPlan, info: DistInfo | None = None) -> RunOutcome:
    """Run a prepared plan in this process (call it in every process of a distributed run).

    Rank 0 writes ``config.yaml``, ``run_info.json``, ``metrics.jsonl``, checkpoints, the adapter and
    ``inference/<dataset>/metrics.json`` (and ``inference_TTA/<dataset>/metrics.json`` for an ``--eval-only``
    run with ``TEST.AUG.ENABLED``) under ``OUTPUT_DIR``; every rank trains and evaluates its share.

    Args:
        plan: from :func:`prepare_run`.
        info: this process's rank and world (default: a single process).
    Returns:
        the trained or evaluated model, the evaluation results and the adapter folder.
    """
    info = info or DistInfo()
    cfg, options = plan.cfg, plan.options
    device = resolve_device(options.device, local_rank=info.local_rank, num_processes=info.world_size)
    _configure_torch(device, info.world_size)
    seed = int(all_gather_objects(plan.seed)[0])  # rank 0's, if each torchrun process picked its own
    seed_everything(seed + info.rank)
    output_dir = plan.output_dir
    metrics = MetricsLog(output_dir / METRICS_FILE if info.is_main else None)
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if plan.start_over:
            (output_dir / LAST_CHECKPOINT).unlink(missing_ok=True)
        dump_config(cfg, output_dir / "config.yaml")
        write_run_info(
            output_dir,
            collect_run_info(
                argv=options.argv,
                device=device,
                world_size=info.world_size,
                seed=seed,
                mode="eval" if options.eval_only else "train",
                lora=plan.lora["name"] if plan.lora else None,
                lora_reference_training=bool(
                    plan.lora and not options.eval_only and cfg.MODEL.LORA.REFERENCE_TRAINING
                ),
                data_root=str(plan.data_root),
                resume_from=str(plan.resume_from) if plan.resume_from else None,
            ),
        )
    logger.info("run on %s, %d process(es), seed %d, output %s", device, info.world_size, seed, output_dir)

    model: nn.Module = build_model(cfg, device)
    if plan.weights is not None:
        load_checkpoint(model, plan.weights)
    if options.eval_only:
        if plan.lora is not None:
            model = load_adapter(model, cfg.MODEL.LORA.DB_PATH, plan.lora["name"])
        tta = TTASettings.from_cfg(cfg)
        return RunOutcome(model=model, results=_evaluate(plan, model, metrics, None, tta=tta))
    reference = plan.lora is not None and bool(cfg.MODEL.LORA.REFERENCE_TRAINING)
    if plan.lora is not None:
        model = attach_lora(model, cfg)  # with REFERENCE_TRAINING: inert q/k/v LoRA, training guidance

    optimizer, _ = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    amp = bool(cfg.SOLVER.AMP.ENABLED) and device.type == "cuda"
    if cfg.SOLVER.AMP.ENABLED and not amp:
        logger.info("SOLVER.AMP.ENABLED is ignored on %s (mixed precision runs on CUDA only)", device)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    start_iter, start_draw = 0, 0
    if plan.resume_from is not None:
        start_iter, start_draw = _resume(plan, model, optimizer, scheduler, scaler)

    catseg = unwrap_model(model)
    mapper = mapper_from_cfg(cfg, is_train=True, num_classes=len(catseg.train_class_names))
    loader = build_train_loader(
        plan.train_records,
        mapper,
        batch_size=cfg.SOLVER.IMS_PER_BATCH // info.world_size,
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        seed=seed,
        start=start_draw,
    )
    train_model = model
    if info.world_size > 1:
        # Some trainable tensors never get a gradient by design (e.g. the q/k LoRA of the last CLIP
        # block, whose dense forward uses only the v path), hence find_unused_parameters.
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    def checkpoint_state() -> dict[str, Any]:
        state = trainable_state_dict(model) if plan.lora is not None else catseg.state_dict()
        return {"model": state, "lora": plan.lora, "seed": seed}

    max_iter = int(cfg.SOLVER.MAX_ITER)
    trainer = Trainer(
        model=train_model,
        optimizer=optimizer,
        scheduler=scheduler,
        data_loader=loader,
        max_iter=max_iter,
        start_iter=start_iter,
        device=device,
        clipper=build_gradient_clipper(cfg),
        grad_scaler=scaler,
        output_dir=output_dir,
        checkpoint_period=int(cfg.SOLVER.CHECKPOINT_PERIOD),
        checkpoint_state=checkpoint_state,
        draws_per_iter=int(cfg.SOLVER.IMS_PER_BATCH),
        start_draw=start_draw,
        eval_period=int(cfg.TEST.EVAL_PERIOD),
        evaluate=lambda iteration: _evaluate(plan, model, metrics, iteration),
        metrics=metrics,
        log_period=options.log_period,
        progress=options.progress,
    )
    trainer.train()

    # Every rank must end with the same weights; record the per-rank digest of the trainable tensors.
    digests = all_gather_objects(state_digest(trainable_state_dict(model)))
    metrics.write({"event": "trainable_digest", "iteration": max_iter - 1, "per_rank": digests})
    if len(set(digests)) > 1:
        raise RuntimeError(f"processes hold different trainable weights after training: {digests}")
    adapter = None
    if plan.lora is not None:
        adapter = plan.adapter_dir
        if info.is_main:
            # prepare_run refused an existing folder unless --overwrite or resuming this adapter's run.
            save_adapter(
                model,  # type: ignore[arg-type]
                cfg.MODEL.LORA.DB_PATH,
                plan.lora["name"],
                overwrite=True,
                training_record=_training_record(unwrap_model(model)) if reference else None,
            )
        barrier()
    results = _evaluate(plan, model, metrics, max_iter - 1)
    return RunOutcome(model=model, results=results, adapter=adapter, iteration=max_iter - 1)
