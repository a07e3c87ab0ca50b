"""Training and evaluation engine: optimizer and LR schedules, LoRA adapters, checkpoints, the training
loop, evaluation on registered datasets, and multi-process launch. ``catseg/train_net.py`` is its CLI.

Importing this package reads nothing and does not import ``peft``: LoRA adapters are the project's own
(:mod:`cat_seg.lora`); PEFT is imported only for options the native LoRA does not implement (DoRA,
trained biases).
"""

from .checkpoint import (
    CHECKPOINT_FORMAT,
    LAST_CHECKPOINT,
    ResumeError,
    check_resume_compatible,
    checkpoint_file_name,
    load_training_checkpoint,
    read_last_checkpoint,
    save_training_checkpoint,
)
from .evaluate import (
    build_eval_loader,
    check_vocabulary,
    copypaste_lines,
    evaluate_datasets,
    format_results_table,
    inference_on_dataset,
    reported_metric,
    unwrap_model,
)
from .launch import DistInfo, launch
from .lora import (
    AdapterError,
    adapter_dir,
    attach_lora,
    check_adapter_folder,
    load_adapter,
    lora_state_dict,
    save_adapter,
    state_digest,
    trainable_state_dict,
)
from .optim import (
    GradientClipper,
    ParamGroupSummary,
    build_gradient_clipper,
    build_optimizer,
    build_param_groups,
)
from .run import RunOptions, RunOutcome, RunPlan, prepare_run, resolve_run_paths, run
from .schedule import (
    LRScheduler,
    WarmupCosineSchedule,
    WarmupMultiStepSchedule,
    WarmupPolySchedule,
    build_lr_schedule,
    build_lr_scheduler,
    lr_at,
)
from .train import MetricsLog, Trainer

__all__ = [
    "CHECKPOINT_FORMAT",
    "LAST_CHECKPOINT",
    "AdapterError",
    "DistInfo",
    "GradientClipper",
    "LRScheduler",
    "MetricsLog",
    "ParamGroupSummary",
    "ResumeError",
    "RunOptions",
    "RunOutcome",
    "RunPlan",
    "Trainer",
    "WarmupCosineSchedule",
    "WarmupMultiStepSchedule",
    "WarmupPolySchedule",
    "adapter_dir",
    "attach_lora",
    "build_eval_loader",
    "build_gradient_clipper",
    "build_lr_schedule",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "check_adapter_folder",
    "check_resume_compatible",
    "check_vocabulary",
    "checkpoint_file_name",
    "copypaste_lines",
    "evaluate_datasets",
    "format_results_table",
    "inference_on_dataset",
    "launch",
    "load_adapter",
    "load_training_checkpoint",
    "lora_state_dict",
    "lr_at",
    "prepare_run",
    "read_last_checkpoint",
    "reported_metric",
    "resolve_run_paths",
    "run",
    "save_adapter",
    "save_training_checkpoint",
    "state_digest",
    "trainable_state_dict",
    "unwrap_model",
]
