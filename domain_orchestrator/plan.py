"""A checked experiment run: :func:`prepare` turns :class:`~domain_orchestrator.settings.ExperimentSettings`
into an :class:`ExperimentPlan` before any model is built.

It reports every problem at once (experiments, domain lists, the SemLA config, the dataset root, each
target's config, class list and validation records, the checkpoint, the adapters and statistics the
experiments need, the embedder, the output folder and ``--resume``'s fingerprint). The plan is picklable:
:func:`domain_orchestrator.loop.run` receives it in every process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cat_seg.config import CfgNode, ConfigError, find_input_path, load_config, resolve_catseg_path
from cat_seg.data import DatasetError, load_records, mapper_from_cfg
from cat_seg.data.domain_spec import DomainSpecError
from cat_seg.data.registry import UnknownDatasetError, domain_spec
from cat_seg.engine.evaluate import check_vocabulary
from cat_seg.modeling.registry import model_architecture
from cat_seg.modeling.text import load_class_names

from .domains import DomainError, get_domain, read_domain_list, register_spec_folder
from .library import ADAPTER_CONFIG
from .prototypes import statistics_path
from .reporting import METRICS_FILE, RESULTS_FILE, RUN_CONFIG_FILE, ResultsBook
from .settings import (
    EXPERIMENT_OPTS,
    EXPERIMENTS,
    TEXT_POLICIES,
    ExperimentError,
    ExperimentSettings,
    SemlaConfig,
    embedding_model_problem,
    load_semla_config,
    semla_column,
)

logger = logging.getLogger(__name__)

__all__ = ["ExperimentPlan", "TargetPlan", "architecture_key", "class_names", "prepare", "target_config"]


@dataclass
class TargetPlan:
    """One target domain, checked: its resolved config and validation records."""

    name: str
    dataset: str
    cfg: CfgNode
    records: list[dict[str, Any]]
    arch: str  # identifies the model architecture the config builds (targets sharing it share the model)


@dataclass
class ExperimentPlan:
    """A checked run, ready for :func:`run` in every process (picklable)."""

    settings: ExperimentSettings
    sources: list[str]
    targets: list[TargetPlan]
    semla: SemlaConfig
    model_weights: Path
    library_path: Path
    library_names: list[str]
    datasets_root: Path
    fingerprint: dict[str, Any]
    finished: list[str] = field(default_factory=list)
    semla_columns: dict[str, SemlaConfig] = field(default_factory=dict)

    @property
    def experiments(self) -> list[str]:
        """The columns of the run: ``--experiment``'s, ``semla`` replaced by its ablation columns if any."""
        return experiment_columns(self.settings.experiments, self.semla_columns)

    def semla_config(self, column: str) -> SemlaConfig:
        """The SemLA settings of a ``semla`` column."""
        return self.semla_columns.get(column, self.semla)

    @property
    def output_dir(self) -> Path:
        return Path(self.settings.output_dir)


def experiment_columns(experiments: Sequence[str], semla_columns: Mapping[str, Any]) -> list[str]:
    """``experiments`` with ``semla`` replaced by its ablation columns (when there are several configs)."""
    out: list[str] = []
    for experiment in experiments:
        out += list(semla_columns) if experiment == "semla" and semla_columns else [experiment]
    return out


def target_config(
    domain: str,
    *,
    model_weights: str | os.PathLike,
    overlays: Sequence[str | os.PathLike] = (),
    opts: Sequence[str] = (),
) -> CfgNode:
    """A domain's config as the experiments use it.

    The domain's config file, then the overlays, then the original's experiment settings (sliding-window
    inference, no class-attention pooling, ``MODEL.WEIGHTS``), then ``opts``.
    """
    return load_config(
        get_domain(domain).config_file,
        [*EXPERIMENT_OPTS, "MODEL.WEIGHTS", str(model_weights), *opts],
        overlays=overlays,
    )


def architecture_key(cfg: CfgNode) -> str:
    """Identifies what :func:`cat_seg.modeling.build_model` builds from ``cfg``, class names aside."""
    return repr(sorted(model_architecture(cfg).items()))


def _file_fingerprint(path: Path) -> dict[str, Any]:
    try:
        stat = path.stat()
    except OSError:
        return {"path": str(path)}
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _fingerprint(
    settings: ExperimentSettings, plan_parts: Mapping[str, Any], world_size: int
) -> dict[str, Any]:
    """What must not change between a run and its ``--resume`` (anything that changes the numbers)."""
    overlays = []
    for p in settings.config_overlays:
        path = Path(p).absolute()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        overlays.append({"path": str(path), "sha256": digest})
    return {
        "experiments": list(settings.experiments),
        "sources": plan_parts["sources"],
        "targets": plan_parts["targets"],
        "semla_config": plan_parts["semla"].as_dict()
        if not plan_parts["semla_columns"]
        else {column: c.as_dict() for column, c in plan_parts["semla_columns"].items()},
        "remove_target_adapter": settings.remove_target_adapter,
        "text_features": settings.text_features,
        "model_weights": _file_fingerprint(plan_parts["model_weights"]),
        "lora_library_path": str(plan_parts["library_path"]),
        "embedding_model": settings.embedding_model,
        "datasets_root": str(plan_parts["datasets_root"]),
        "config_overlays": overlays,
        "domain_specs": _spec_fingerprints([*plan_parts["sources"], *plan_parts["targets"]]),
        "opts": list(settings.opts),
        "batch_size": settings.batch_size,
        "world_size": world_size,
    }


def _spec_fingerprints(domains: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The spec file and class list of each domain of your own among ``domains`` (they change the numbers)."""
    out = {}
    for name in dict.fromkeys(domains):
        spec = domain_spec(name)
        if spec is not None:
            out[name] = {
                "spec": str(spec.path),
                "sha256": hashlib.sha256(spec.path.read_bytes()).hexdigest(),
                "classes": list(spec.class_names),
            }
    return out


def _output_files_present(output_dir: Path) -> list[Path]:
    candidates = [output_dir / RUN_CONFIG_FILE, output_dir / METRICS_FILE, output_dir / RESULTS_FILE]
    candidates += [output_dir / e / RESULTS_FILE for e in EXPERIMENTS]
    return [p for p in candidates if p.is_file()]


def prepare(settings: ExperimentSettings, *, world_size: int = 1) -> ExperimentPlan:
    """Check everything that does not need the model, and load every target's records.

    Reports every problem at once: experiments and text policy, the domain lists, the SemLA config, the
    dataset root and each target's validation data and class list, the checkpoint file, each needed
    adapter folder and statistics file, the embedding model, and the output folder (an existing run
    needs ``--resume`` or ``--overwrite``; ``--resume`` needs the same settings).

    Args:
        settings: the command line.
        world_size: processes of the run (progress files are per process).
    Returns:
        the plan to give :func:`run` in every process.
    Raises:
        ExperimentError: listing the problems.
    """
    problems: list[str] = []  # every helper adds what it finds; all are reported together
    _check_options(settings, problems)
    sources, targets = _read_domain_lists(settings, problems)
    semla = _read_semla_config(settings, problems)
    semla_columns = _read_semla_columns(settings, problems)
    root = _dataset_root(settings, problems)
    model_weights = find_input_path(settings.model_weights)
    if not model_weights.is_file():
        problems.append(
            f"CAT-Seg checkpoint {settings.model_weights} not found (looked at {model_weights}); pass "
            "--model_weights PATH (the original expects catseg/models/model_final.pth)"
        )
    for overlay in settings.config_overlays:
        if not Path(overlay).is_file():
            problems.append(f"--config_overlay {overlay}: file not found")
    target_plans = [
        plan
        for name in targets
        if (plan := _plan_target(name, settings, model_weights, root, problems)) is not None
    ]
    library_path = find_input_path(settings.lora_library_path)
    library_names = _check_library(settings, sources, targets, library_path, problems)
    parts = {
        "sources": sources,
        "targets": targets,
        "semla": semla,
        "semla_columns": semla_columns,
        "model_weights": model_weights,
        "library_path": library_path,
        "datasets_root": root,
    }
    fingerprint = _fingerprint(settings, parts, world_size)
    columns = experiment_columns(settings.experiments, semla_columns)
    finished = _check_output_dir(settings, columns, fingerprint, sources, targets, problems)
    if problems:
        raise ExperimentError(problems)
    return ExperimentPlan(
        settings=settings,
        sources=sources,
        targets=target_plans,
        semla=semla,
        model_weights=model_weights,
        library_path=library_path,
        library_names=library_names,
        datasets_root=root,
        fingerprint=fingerprint,
        finished=finished,
        semla_columns=semla_columns,
    )


def _check_options(settings: ExperimentSettings, problems: list[str]) -> None:
    """The experiment names, the text policy and the batch size."""
    experiments = list(settings.experiments)
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if not experiments or unknown:
        problems.append(f"--experiment must be one or more of {', '.join(EXPERIMENTS)}; got {experiments}")
    if len(set(experiments)) != len(experiments):
        problems.append(f"--experiment repeats a name: {experiments}")
    if settings.text_features not in TEXT_POLICIES:
        problems.append(f"--text_features must be one of {TEXT_POLICIES}, got {settings.text_features!r}")
    if settings.batch_size < 1:
        problems.append(f"--batch_size must be >= 1, got {settings.batch_size}")


def _read_domain_lists(settings: ExperimentSettings, problems: list[str]) -> tuple[list[str], list[str]]:
    """``--domain_specs``, then the source and target lists; a problem of both lists is reported once."""
    if settings.domain_specs is not None:
        try:
            register_spec_folder(settings.domain_specs)
        except (DomainSpecError, FileNotFoundError) as e:
            problems.append(f"--domain_specs {settings.domain_specs}: {e}")
    list_problems: dict[str, list[str]] = {}  # one message per problem, naming every flag it came from

    def read_list(path: Path | None, what: str, flag: str, required: bool) -> list[str]:
        if path is None:
            if required:
                problems.append(f"{flag} is required (a YAML list of {what})")
            return []
        try:
            return read_domain_list(path, what="domains")
        except (DomainError, FileNotFoundError) as e:
            list_problems.setdefault(str(e), []).append(flag)
            return []

    needs_sources = bool({"uniform", "semla"} & set(settings.experiments))
    sources = read_list(settings.source_domains, "source domains", "--source_domains", needs_sources)
    targets = read_list(settings.target_domains, "target domains", "--target_domains", True)
    for message, flags in list_problems.items():
        problems.append(f"{' and '.join(flags)}: {message}")
    return sources, targets


def _read_semla_config(settings: ExperimentSettings, problems: list[str]) -> SemlaConfig:
    if settings.semla_config is None:
        return SemlaConfig()
    try:
        return load_semla_config(settings.semla_config)
    except ExperimentError as e:
        problems.extend(e.problems)
    except FileNotFoundError as e:
        problems.append(str(e))
    return SemlaConfig()


def _read_semla_columns(settings: ExperimentSettings, problems: list[str]) -> dict[str, SemlaConfig]:
    """Several ``--semla_config`` files: one column each (``semla-<stem>``); none or one: no columns."""
    columns: dict[str, SemlaConfig] = {}
    for path in settings.semla_configs:
        column = semla_column(path)
        if column in columns:
            problems.append(f"--semla_config: two files named {Path(path).stem!r}; their columns would clash")
            continue
        try:
            columns[column] = load_semla_config(path)
        except ExperimentError as e:
            problems.extend(e.problems)
        except FileNotFoundError as e:
            problems.append(str(e))
    if columns and "semla" not in settings.experiments:
        problems.append("several --semla_config files make semla columns; add semla to --experiment")
    return columns


def _dataset_root(settings: ExperimentSettings, problems: list[str]) -> Path:
    """The absolute dataset root (``Path()`` when missing: targets then load no records)."""
    root = settings.datasets_root
    if root is None:
        problems.append("no dataset root: pass --datasets_root DIR or set $DETECTRON2_DATASETS")
    elif not Path(root).expanduser().is_dir():
        problems.append(f"dataset root {root} does not exist (--datasets_root or $DETECTRON2_DATASETS)")
        root = None
    return Path(root).expanduser().absolute() if root is not None else Path()


def _plan_target(
    name: str, settings: ExperimentSettings, model_weights: Path, root: Path, problems: list[str]
) -> TargetPlan | None:
    """A target's config (checked against its dataset's classes) and validation records."""
    try:
        cfg = target_config(
            name, model_weights=model_weights, overlays=settings.config_overlays, opts=settings.opts
        )
        dataset = get_domain(name).val_dataset
        check_vocabulary(
            class_names(cfg),
            dataset,
            source=f"the config of {name} (MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON)",
        )
        mapper_from_cfg(cfg, is_train=False)
        arch = architecture_key(cfg)
    except (ConfigError, ValueError, FileNotFoundError, UnknownDatasetError) as e:
        problems.append(f"target {name}: {e}")
        return None
    records: list[dict[str, Any]] = []
    if settings.datasets_root is not None and root != Path():
        try:
            records = load_records(dataset, root)
            if not records:
                problems.append(f"target {name}: {dataset} has no images under {root}")
        except (DatasetError, FileNotFoundError) as e:
            problems.append(f"target {name}: {dataset} is not usable under {root}: {e}")
    return TargetPlan(name, dataset, cfg, records, arch)


def _check_library(
    settings: ExperimentSettings,
    sources: list[str],
    targets: list[str],
    library_path: Path,
    problems: list[str],
) -> list[str]:
    """The adapters the experiments use (sources; the targets' own for oracle), the statistics and embedder
    of semla; returns the library's adapter names, in order."""
    experiments = settings.experiments
    library_names = list(sources) if {"uniform", "semla"} & set(experiments) else []
    if "oracle" in experiments:
        library_names += [t for t in targets if t not in library_names]
    if library_names and not library_path.is_dir():
        problems.append(
            f"adapter library {settings.lora_library_path} not found (looked at {library_path}); pass "
            "--lora_library_path DIR (the original expects catseg/loradb/)"
        )
    elif library_names:
        for name in library_names:
            if not (library_path / name / ADAPTER_CONFIG).is_file():
                why = "the oracle of this target" if name not in sources else "a source domain"
                problems.append(f"adapter {name!r} ({why}) not found: {library_path / name / ADAPTER_CONFIG}")
    if "semla" in experiments:
        for name in sources:
            if (library_path / name).is_dir() and not statistics_path(library_path / name, name).is_file():
                problems.append(
                    f"statistics of source {name!r} not found: {statistics_path(library_path / name, name)}; "
                    "compute them with domain_orchestrator/generate_embeddings.py"
                )
        if not settings.embedding_model:
            problems.append(
                "--embedding_model is required for semla: 'catseg', a local Hugging Face CLIPModel folder "
                "(the original uses openai/clip-vit-large-patch14), or open_clip:<model>:<checkpoint>"
            )
        elif (problem := embedding_model_problem(settings.embedding_model)) is not None:
            problems.append(problem)
    return library_names


def _check_output_dir(
    settings: ExperimentSettings,
    columns: list[str],
    fingerprint: dict[str, Any],
    sources: list[str],
    targets: list[str],
    problems: list[str],
) -> list[str]:
    """An output folder holding results needs ``--resume`` (same fingerprint) or ``--overwrite``; returns
    the targets an earlier run finished."""
    output_dir = Path(settings.output_dir)
    present = _output_files_present(output_dir)
    if settings.resume and (output_dir / RUN_CONFIG_FILE).is_file():
        previous = json.loads((output_dir / RUN_CONFIG_FILE).read_text(encoding="utf-8")).get(
            "fingerprint", {}
        )
        changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
        if changed:
            problems.append(
                f"--resume: {output_dir} holds a run with other settings ({', '.join(changed)} differ); "
                "resume with the same command, or use another --output_dir (--overwrite starts over)"
            )
            return []
        try:
            return ResultsBook.load(
                output_dir, experiments=columns, targets=targets, sources=sources
            ).finished()
        except (ValueError, KeyError, OSError) as e:
            problems.append(f"--resume: the outputs in {output_dir} cannot be read back ({e})")
    elif present and not settings.resume and not settings.overwrite:
        problems.append(
            f"{output_dir} already holds results ({present[0].name}); pass --resume to continue that run, "
            "--overwrite to start over, or choose another --output_dir"
        )
    return []


def class_names(cfg: CfgNode) -> list[str]:
    """The test vocabulary of a config (``MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON``)."""
    return load_class_names(resolve_catseg_path(cfg.MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON))
