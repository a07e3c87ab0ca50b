"""The four experiments of SemLA's main table: ``zeroshot``, ``oracle``, ``uniform`` and ``semla``.

For every target domain, each requested experiment predicts the target's validation images with the
CAT-Seg base model plus a weighted combination of library adapters, and is scored with the target's
metric (cityscapesScripts ``IoU`` for ACDC, MUSES and Cityscapes; ``mIoU`` otherwise):

- ``zeroshot``: the base model alone;
- ``oracle``: the target's own adapter alone (weight 1);
- ``uniform``: every source adapter at 1/N (without the target's with ``--remove_target_adapter``);
- ``semla``: per image, the image's CLIP embedding is scored against each source domain's prototype
  (the mean embedding of its training images), the ``top_k`` closest are kept and weighted by
  softmax(score / temperature) (:mod:`domain_orchestrator.retrieval`).

Everything runs through :func:`domain_orchestrator.fusion.fused_adapters`: one base model, the adapters
stacked once, a weight vector per image, no PEFT module surgery. The model, the library, the data of a
target and its images' embeddings are loaded once and shared by all experiments: each batch of images
is read once and predicted by every experiment in turn.

Flow: :func:`prepare` checks everything that can be checked without building the model and reports all
problems together; :func:`run` (in every process of a distributed run) builds the model, opens and
validates the library, the embedder and the prototypes (again reporting every problem together), then
evaluates target after target. Progress inside a target is saved every ``save_every`` seconds and when
the run is interrupted, so ``resume`` continues where it stopped (the final numbers equal those of an
uninterrupted run: the same batches are formed). Under ``torch.distributed`` each process evaluates a
contiguous shard of every target's images; confusion matrices are summed and weights gathered, so the
outputs equal a one-process run.

Class-text features under fusion (``text_features``): ``per_image`` (default) encodes the class prompts
under each image's own fused adapters, what the method means; ``reference`` reproduces the original
code, which encoded them once per target under the adapters of the target's first image and reused
them for every other image.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cat_seg.config import CfgNode, ConfigError, find_input_path, load_config, resolve_catseg_path
from cat_seg.data import DatasetError, InferenceSampler, get_dataset, load_records, mapper_from_cfg
from cat_seg.data.build import MappedDataset, trivial_batch_collator
from cat_seg.data.domain_spec import DomainSpecError
from cat_seg.data.registry import UnknownDatasetError, domain_spec
from cat_seg.engine.evaluate import check_vocabulary, label_prediction
from cat_seg.engine.launch import DistInfo, all_gather_objects, barrier
from cat_seg.engine.setup import collect_run_info, resolve_device
from cat_seg.evaluation import SemSegEvaluator
from cat_seg.fileio import atomic_write
from cat_seg.progress import progress

from .domains import DomainError, get_domain, read_domain_list, register_spec_folder
from .library import ADAPTER_CONFIG, AdapterLibrary, AdapterLibraryError
from .prototypes import load_prototypes, statistics_path
from .reporting import ImageWeights, ResultsBook, format_summary
from .retrieval import semla_weights, uniform_weights

logger = logging.getLogger(__name__)

__all__ = [
    "EXPERIMENTS",
    "TEXT_POLICIES",
    "ExperimentError",
    "ExperimentPlan",
    "ExperimentSettings",
    "SemlaConfig",
    "load_semla_config",
    "prepare",
    "run",
    "target_config",
]

EXPERIMENTS = ("zeroshot", "oracle", "uniform", "semla")
TEXT_POLICIES = ("per_image", "reference")
RUN_CONFIG_FILE = "run_config.json"
PROGRESS_DIR = "progress"
#: What the original code always adds to a domain's config for experiments (``custom_domain_args``).
EXPERIMENT_OPTS = ("TEST.SLIDING_WINDOW", "True", "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]")


class ExperimentError(ValueError):
    """A run that cannot start or continue; the message lists every problem found and what to do."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


# --------------------------------------------------------------------------------------------------
# semla_config.yaml
# --------------------------------------------------------------------------------------------------

# The original's shipped file and README call the measure ``distance_measure_name``; its code reads
# ``similarity_measure_name`` (and silently ignores the other). Both spellings are accepted here.
_MEASURE_KEYS = ("distance_measure_name", "similarity_measure_name")
_SEMLA_KEYS = (*_MEASURE_KEYS, "temperature", "top_k", "combination_type")


@dataclass(frozen=True)
class SemlaConfig:
    """SemLA's retrieval settings (the original's defaults).

    Attributes:
        measure: ``euclidean`` (score 1 / distance, the original's effective choice) or ``cosine``
            (cosine similarity; the original's cosine option used the distance and picked the farthest
            domains).
        temperature: softmax temperature, > 0.
        top_k: adapters kept per image, >= 1 (all candidates when fewer).
        combination_type: ``cat`` only (PEFT ``add_weighted_adapter``'s exact weighted sum of deltas).
    """

    measure: str = "euclidean"
    temperature: float = 0.05
    top_k: int = 5
    combination_type: str = "cat"

    def as_dict(self) -> dict[str, Any]:
        return {
            "distance_measure_name": self.measure,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "combination_type": self.combination_type,
        }


def load_semla_config(path: str | os.PathLike | None) -> SemlaConfig:
    """Read and check ``semla_config.yaml``; None gives the defaults.

    Raises:
        FileNotFoundError: the file does not exist.
        ExperimentError: every problem: unknown keys (with a "did you mean"), wrong types or values,
            both measure keys with different values, a combination type other than ``cat``.
    """
    if path is None:
        return SemlaConfig()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SemLA config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ExperimentError([f"{path}: not valid YAML ({e})"]) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ExperimentError([f"{path}: expected a mapping of keys ({', '.join(_SEMLA_KEYS)})"])
    problems = []
    for key in data:
        if key not in _SEMLA_KEYS:
            close = difflib.get_close_matches(str(key), _SEMLA_KEYS, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{path}: unknown key {key!r}; {hint}known keys: {', '.join(_SEMLA_KEYS)}")
    measures = {data[k] for k in _MEASURE_KEYS if k in data}
    defaults = SemlaConfig()
    measure = defaults.measure
    if len(measures) > 1:
        problems.append(
            f"{path}: {_MEASURE_KEYS[0]} and {_MEASURE_KEYS[1]} disagree ({sorted(map(str, measures))})"
        )
    elif measures:
        measure = measures.pop()
        if measure not in ("euclidean", "cosine"):
            problems.append(f"{path}: distance_measure_name must be 'euclidean' or 'cosine', got {measure!r}")
    temperature = data.get("temperature", defaults.temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        problems.append(f"{path}: temperature must be a number > 0, got {temperature!r}")
    elif not math.isfinite(temperature):
        problems.append(f"{path}: temperature must be finite, got {temperature!r}")
    top_k = data.get("top_k", defaults.top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        problems.append(f"{path}: top_k must be an integer >= 1, got {top_k!r}")
    combination = data.get("combination_type", defaults.combination_type)
    if combination != "cat":
        problems.append(
            f"{path}: combination_type {combination!r} is not supported; only 'cat' (PEFT add_weighted_adapter's "
            "exact weighted sum of the adapters' deltas, the original's setting) is implemented"
        )
    if problems:
        raise ExperimentError(problems)
    return SemlaConfig(
        measure=measure, temperature=float(temperature), top_k=int(top_k), combination_type="cat"
    )


# --------------------------------------------------------------------------------------------------
# Settings and plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentSettings:
    """What the command line asks for (paths as given).

    Attributes:
        experiments: subset of :data:`EXPERIMENTS`, in the order to report them.
        source_domains, target_domains: YAML lists of domains (names, or domain spec files).
        domain_specs: a folder of domain specs (``*.yaml``) to register before reading the lists.
        semla_config: YAML of :class:`SemlaConfig` keys, or None for the defaults.
        output_dir: where the outputs go.
        remove_target_adapter: leave the target's own adapter out of ``uniform`` and ``semla``.
        model_weights: CAT-Seg checkpoint (relative paths: to the current directory, else ``catseg/``).
        lora_library_path: the adapter library (same path rule).
        embedding_model: ``catseg``, a Hugging Face CLIPModel folder, or an open_clip model (semla only).
        datasets_root: the dataset root.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per forward pass.
        num_workers: data-loader workers (None: the configs' ``DATALOADER.NUM_WORKERS``).
        text_features: ``per_image`` or ``reference`` (see the module docstring).
        config_overlays: YAML files merged over every domain's config (e.g. another model).
        opts: ``KEY VALUE`` overrides applied to every domain's config, last.
        resume: continue the run in ``output_dir``.
        overwrite: start over in an ``output_dir`` that holds a run.
        save_every: seconds between progress saves inside a target (0: after every batch).
        progress: show progress.
        argv: the command line, recorded in ``run_config.json``.
    """

    experiments: tuple[str, ...]
    source_domains: Path | None
    target_domains: Path | None
    output_dir: Path
    domain_specs: Path | None = None
    model_weights: str = "models/model_final.pth"
    lora_library_path: str = "loradb"
    semla_config: Path | None = None
    remove_target_adapter: bool = False
    embedding_model: str | None = None
    datasets_root: Path | None = None
    device: str = "auto"
    batch_size: int = 1
    num_workers: int | None = None
    text_features: str = "per_image"
    config_overlays: tuple[Path, ...] = ()
    opts: tuple[str, ...] = ()
    resume: bool = False
    overwrite: bool = False
    save_every: float = 180.0
    progress: bool = True
    argv: tuple[str, ...] = ()


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

    @property
    def experiments(self) -> list[str]:
        return list(self.settings.experiments)

    @property
    def output_dir(self) -> Path:
        return Path(self.settings.output_dir)


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
    from cat_seg.modeling.build import model_kwargs_from_cfg

    return repr(sorted(model_kwargs_from_cfg(cfg).items()))


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
        "semla_config": plan_parts["semla"].as_dict(),
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
    from .reporting import METRICS_FILE, RESULTS_FILE

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
    problems: list[str] = []
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
    needs_sources = bool({"uniform", "semla"} & set(experiments))
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

    sources = read_list(settings.source_domains, "source domains", "--source_domains", needs_sources)
    targets = read_list(settings.target_domains, "target domains", "--target_domains", True)
    for message, flags in list_problems.items():
        problems.append(f"{' and '.join(flags)}: {message}")
    semla = SemlaConfig()
    if settings.semla_config is not None:
        try:
            semla = load_semla_config(settings.semla_config)
        except ExperimentError as e:
            problems.extend(e.problems)
        except FileNotFoundError as e:
            problems.append(str(e))

    root = settings.datasets_root
    if root is None:
        problems.append("no dataset root: pass --datasets_root DIR or set $DETECTRON2_DATASETS")
    elif not Path(root).expanduser().is_dir():
        problems.append(f"dataset root {root} does not exist (--datasets_root or $DETECTRON2_DATASETS)")
        root = None
    root = Path(root).expanduser().absolute() if root is not None else Path()

    model_weights = find_input_path(settings.model_weights)
    if not model_weights.is_file():
        problems.append(
            f"CAT-Seg checkpoint {settings.model_weights} not found (looked at {model_weights}); pass "
            "--model_weights PATH (the original expects catseg/models/model_final.pth)"
        )
    for overlay in settings.config_overlays:
        if not Path(overlay).is_file():
            problems.append(f"--config_overlay {overlay}: file not found")

    target_plans: list[TargetPlan] = []
    for name in targets:
        try:
            cfg = target_config(
                name, model_weights=model_weights, overlays=settings.config_overlays, opts=settings.opts
            )
            dataset = get_domain(name).val_dataset
            check_vocabulary(
                _class_names(cfg),
                dataset,
                source=f"the config of {name} (MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON)",
            )
            mapper_from_cfg(cfg, is_train=False)
            arch = architecture_key(cfg)
        except (ConfigError, ValueError, FileNotFoundError, UnknownDatasetError) as e:
            problems.append(f"target {name}: {e}")
            continue
        records: list[dict[str, Any]] = []
        if settings.datasets_root is not None and root != Path():
            try:
                records = load_records(dataset, root)
                if not records:
                    problems.append(f"target {name}: {dataset} has no images under {root}")
            except (DatasetError, FileNotFoundError) as e:
                problems.append(f"target {name}: {dataset} is not usable under {root}: {e}")
        target_plans.append(TargetPlan(name, dataset, cfg, records, arch))

    library_path = find_input_path(settings.lora_library_path)
    library_names = list(sources) if needs_sources else []
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
        elif settings.embedding_model != "catseg" and not settings.embedding_model.startswith("open_clip:"):
            if not Path(settings.embedding_model).expanduser().exists():
                problems.append(f"--embedding_model {settings.embedding_model}: no such folder")

    parts = {
        "sources": sources,
        "targets": targets,
        "semla": semla,
        "model_weights": model_weights,
        "library_path": library_path,
        "datasets_root": root,
    }
    fingerprint = _fingerprint(settings, parts, world_size)
    output_dir = Path(settings.output_dir)
    finished: list[str] = []
    present = _output_files_present(output_dir)
    if settings.resume and (output_dir / RUN_CONFIG_FILE).is_file():
        import json

        previous = json.loads((output_dir / RUN_CONFIG_FILE).read_text(encoding="utf-8")).get(
            "fingerprint", {}
        )
        changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
        if changed:
            problems.append(
                f"--resume: {output_dir} holds a run with other settings ({', '.join(changed)} differ); "
                "resume with the same command, or use another --output_dir (--overwrite starts over)"
            )
        else:
            try:
                finished = ResultsBook.load(
                    output_dir, experiments=experiments, targets=targets, sources=sources
                ).finished()
            except (ValueError, KeyError, OSError) as e:
                problems.append(f"--resume: the outputs in {output_dir} cannot be read back ({e})")
    elif present and not settings.resume and not settings.overwrite:
        problems.append(
            f"{output_dir} already holds results ({present[0].name}); pass --resume to continue that run, "
            "--overwrite to start over, or choose another --output_dir"
        )
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
    )


def _class_names(cfg: CfgNode) -> list[str]:
    from cat_seg.modeling.text import load_class_names

    return load_class_names(resolve_catseg_path(cfg.MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON))


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass
class _TargetProgress:
    """Where one process stands inside one target (saved to ``progress/<target>.rank<r>.pt``)."""

    position: int = 0  # images of this process's shard done
    confusion: dict[str, torch.Tensor] = field(default_factory=dict)
    num_images: dict[str, int] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None  # (n, D) of the shard, once computed

    def state(
        self, *, target: str, rank: int, world_size: int, batch_size: int, shard: int
    ) -> dict[str, Any]:
        return {
            "format": 1,
            "target": target,
            "rank": rank,
            "world_size": world_size,
            "batch_size": batch_size,
            "shard": shard,
            "position": self.position,
            "confusion": self.confusion,
            "num_images": self.num_images,
            "embeddings": self.embeddings,
        }


class _Session:
    """The models, library, embedder and prototypes of one process, built and validated once."""

    def __init__(self, plan: ExperimentPlan, device: torch.device, info: DistInfo) -> None:
        from cat_seg.checkpoint import load_checkpoint
        from cat_seg.modeling import build_model

        self.plan = plan
        self.device = device
        self.info = info
        problems: list[str] = []
        self.models: dict[str, Any] = {}
        self.libraries: dict[str, AdapterLibrary | None] = {}
        for target in plan.targets:
            if target.arch in self.models:
                continue
            model = build_model(target.cfg, device, class_names=False)
            try:
                load_checkpoint(model, plan.model_weights)
            except (ValueError, OSError) as e:
                problems.append(f"checkpoint {plan.model_weights}: {e}")
            model.eval()
            self.models[target.arch] = model
            library = None
            if plan.library_names:
                try:
                    library = AdapterLibrary.open(
                        plan.library_path, plan.library_names, model=model, statistics=False, device=device
                    )
                except AdapterLibraryError as e:
                    problems.append(str(e))
            self.libraries[target.arch] = library
        opened = next((lib for lib in self.libraries.values() if lib is not None), None)
        reference = [i.name for i in opened.infos if i.reference_training] if opened is not None else []
        if reference and info.is_main:
            logger.warning(
                "adapters trained in the original trainer's mode (MODEL.LORA.REFERENCE_TRAINING: inert CLIP "
                "q/k/v LoRA, first guidance block twice during training; see their semla_training.json): %s",
                ", ".join(reference),
            )
        self.embedder = None
        self.prototypes: torch.Tensor | None = None
        if "semla" in plan.experiments:
            first_model = next(iter(self.models.values()))
            self.embedder, self.prototypes = self._retrieval_setup(first_model, problems)
        if problems:
            raise ExperimentError(problems)

    def _retrieval_setup(self, model: Any, problems: list[str]) -> tuple[Any, torch.Tensor | None]:
        from .embedding import EmbeddingError, load_embedder

        spec = self.plan.settings.embedding_model
        try:
            embedder = load_embedder(spec, device=self.device, catseg_model=model)
        except (EmbeddingError, OSError, ValueError) as e:
            problems.append(f"--embedding_model {spec}: {e}")
            embedder = None
        prototypes = load_prototypes(
            self.plan.library_path,
            self.plan.sources,
            embedder.identity if embedder is not None else None,
            spec=f"--embedding_model {spec}",
        )
        problems.extend(prototypes.problems)
        if prototypes.unverified and self.info.is_main:
            logger.warning(
                "the statistics of %s record no embedder (made by the original code or released with it); "
                "they are assumed to come from %s",
                ", ".join(prototypes.unverified),
                spec,
            )
        vectors = torch.from_numpy(prototypes.vectors) if prototypes.vectors is not None else None
        return embedder, vectors

    # -- one target ----------------------------------------------------------------------------------
    def run_target(
        self, target: TargetPlan
    ) -> tuple[dict[str, dict[str, Any]], list[ImageWeights], dict[str, float]]:
        """Evaluate every experiment on one target; returns metrics, semla per-image weights, uniform weights."""
        from .fusion import fused_adapters, fused_text_features

        plan, info = self.plan, self.info
        settings = plan.settings
        model = self.models[target.arch]
        library = self.libraries[target.arch]
        spec = get_dataset(target.dataset)
        model.set_class_names(test=_class_names(target.cfg))
        model.sliding_window = bool(target.cfg.TEST.SLIDING_WINDOW)
        mapper = mapper_from_cfg(target.cfg, is_train=False, num_classes=spec.num_classes)
        begin, end = _shard(len(target.records), settings.batch_size, info)
        shard = target.records[begin:end]
        state = self._load_progress(target, len(shard))
        evaluators = {}
        for experiment in plan.experiments:
            evaluator = SemSegEvaluator(
                spec.num_classes,
                spec.ignore_label,
                class_names=spec.class_names(),
                convention=spec.metric_convention,
            )
            if experiment in state.confusion:
                evaluator.add_confusion(state.confusion[experiment].numpy(), state.num_images[experiment])
            evaluators[experiment] = evaluator

        # Weights (B, N) over the library columns; uniform and semla use the sources only.
        num_adapters = len(library) if library is not None else 0
        source_columns = library.index(plan.sources) if library is not None and plan.sources else []
        exclude = (
            [plan.sources.index(target.name)]
            if settings.remove_target_adapter and target.name in plan.sources
            else None
        )

        def to_library(local: torch.Tensor) -> torch.Tensor:
            full = torch.zeros(local.shape[0], num_adapters, dtype=torch.float64)
            full[:, source_columns] = local
            return full

        weights: dict[str, torch.Tensor] = {}
        uniform_record: dict[str, float] = {}
        if "oracle" in plan.experiments:
            weights["oracle"] = torch.zeros(1, num_adapters, dtype=torch.float64)
            weights["oracle"][0, library.index(target.name)[0]] = 1.0
        if "uniform" in plan.experiments:
            weights["uniform"] = to_library(uniform_weights(len(plan.sources), exclude=exclude))
            uniform_record = {
                name: float(w)
                for name, w in zip(plan.sources, weights["uniform"][0, source_columns])
                if w != 0
            }
        semla_rows = first_row = None
        if "semla" in plan.experiments:
            if state.embeddings is None:
                files = [r["file_name"] for r in shard]
                state.embeddings = torch.from_numpy(self._embed(files, f"{target.name} embeddings"))
                self._save_progress(target, state, len(shard))
            semla_rows = to_library(self._semla_weights(state.embeddings, exclude))
            if settings.text_features == "reference":
                first = state.embeddings[:1] if begin == 0 and len(shard) else None
                if first is None:  # the target's first image is in another process's shard
                    first = torch.from_numpy(self._embed([target.records[0]["file_name"]], "first image"))
                first_row = to_library(self._semla_weights(first, exclude))

        # Class-text features shared by all images of the target (computed on first use).
        shared_text: dict[str, torch.Tensor] = {}

        def text_for(experiment: str, rows: torch.Tensor | None) -> torch.Tensor:
            if experiment == "semla" and settings.text_features == "per_image":
                return fused_text_features(model, library, rows)  # (B, T, P, C)
            if experiment not in shared_text:
                if experiment == "zeroshot":
                    shared_text[experiment] = model.text_features()
                else:
                    base = first_row if experiment == "semla" else weights[experiment]
                    shared_text[experiment] = fused_text_features(model, library, base)[0]
            return shared_text[experiment]

        loader = torch.utils.data.DataLoader(
            MappedDataset(shard[state.position :], mapper),
            batch_size=settings.batch_size,
            shuffle=False,
            num_workers=self._num_workers(target.cfg),
            collate_fn=trivial_batch_collator,
        )
        resize_to_label = spec.resize_to is not None
        last_save = time.monotonic()
        start, done_here = time.monotonic(), 0
        committing = False
        try:
            batches = progress(
                loader,
                total=len(shard),
                initial=state.position,
                desc=f"{target.name}" + (f" [rank {info.rank}]" if info.world_size > 1 else ""),
                unit="img",
                enabled=settings.progress and info.is_main,
                log=logger,
                weight=len,
            )
            with torch.no_grad():
                for batch in batches:
                    rows_of_batch = None
                    if semla_rows is not None:
                        rows_of_batch = semla_rows[state.position : state.position + len(batch)]
                    predictions: dict[str, list] = {}
                    for experiment in plan.experiments:
                        rows = rows_of_batch if experiment == "semla" else weights.get(experiment)
                        text = text_for(experiment, rows)
                        if experiment == "zeroshot":
                            outputs = model(batch, text_features=text)
                        else:
                            with fused_adapters(model, library, rows):
                                outputs = model(batch, text_features=text)
                        predictions[experiment] = [
                            label_prediction(o["sem_seg"], x["sem_seg"], resize_to_label=resize_to_label)
                            for o, x in zip(outputs, batch)
                        ]
                    committing = True
                    for experiment, preds in predictions.items():
                        for pred, x in zip(preds, batch):
                            evaluators[experiment].process(pred, x["sem_seg"], name=str(x.get("file_name")))
                    state.position += len(batch)
                    committing = False
                    done_here += len(batch)
                    if time.monotonic() - last_save >= settings.save_every:
                        self._snapshot(state, evaluators)
                        self._save_progress(target, state, len(shard))
                        last_save = time.monotonic()
        except BaseException:
            if not committing and done_here:
                self._snapshot(state, evaluators)
                self._save_progress(target, state, len(shard))
                logger.warning(
                    "%s: interrupted after %d of %d images of this process; progress saved, --resume continues",
                    target.name,
                    state.position,
                    len(shard),
                )
            raise
        seconds = time.monotonic() - start
        if done_here:
            logger.info(
                "%s: %d images in %.1f s (%.3f s/image, %d experiment(s) each)",
                target.name,
                done_here,
                seconds,
                seconds / done_here,
                len(plan.experiments),
            )
        metrics = {e: evaluators[e].evaluate()["sem_seg"] for e in plan.experiments}
        image_weights: list[ImageWeights] = []
        if semla_rows is not None:
            local = [
                _image_weights(record, row, library.names, plan.datasets_root)
                for record, row in zip(shard, semla_rows)
            ]
            image_weights = [w for part in all_gather_objects(local) for w in part]
        return metrics, image_weights, uniform_record

    # -- helpers ------------------------------------------------------------------------------------
    def _semla_weights(self, embeddings: torch.Tensor, exclude: list[int] | None) -> torch.Tensor:
        from .retrieval import scores

        semla = self.plan.semla
        s = scores(embeddings.double(), self.prototypes.double(), semla.measure)  # (n, S)
        return semla_weights(s, semla.top_k, semla.temperature, exclude=exclude)

    def _embed(self, files: Sequence[str], desc: str) -> np.ndarray:
        if not files:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        settings = self.plan.settings
        return self.embedder.embed_files(
            files,
            # One image per forward pass, as the original: a vector must not depend on which images share
            # its batch (batched matmuls round differently), so that results do not depend on the number
            # of processes or on --batch_size.
            batch_size=1,
            num_workers=settings.num_workers or 0,
            progress=settings.progress and self.info.is_main,
            desc=desc,
        )

    def _num_workers(self, cfg: CfgNode) -> int:
        workers = self.plan.settings.num_workers
        return int(cfg.DATALOADER.NUM_WORKERS) if workers is None else workers

    @staticmethod
    def _snapshot(state: _TargetProgress, evaluators: Mapping[str, SemSegEvaluator]) -> None:
        state.confusion = {e: torch.from_numpy(ev.confusion_matrix) for e, ev in evaluators.items()}
        state.num_images = {e: ev.num_images for e, ev in evaluators.items()}

    def _progress_file(self, target: TargetPlan) -> Path:
        return self.plan.output_dir / PROGRESS_DIR / f"{target.name}.rank{self.info.rank}.pt"

    def _save_progress(self, target: TargetPlan, state: _TargetProgress, shard: int) -> None:
        settings = self.plan.settings
        payload = state.state(
            target=target.name,
            rank=self.info.rank,
            world_size=self.info.world_size,
            batch_size=settings.batch_size,
            shard=shard,
        )
        atomic_write(self._progress_file(target), lambda f: torch.save(payload, f))

    def _load_progress(self, target: TargetPlan, shard: int) -> _TargetProgress:
        path = self._progress_file(target)
        if not (self.plan.settings.resume and path.is_file()):
            return _TargetProgress()
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file: say which and stop
            raise ExperimentError(
                [f"{path}: progress file cannot be read ({e}); delete it to redo {target.name}"]
            ) from None
        expected = {
            "target": target.name,
            "rank": self.info.rank,
            "world_size": self.info.world_size,
            "batch_size": self.plan.settings.batch_size,
            "shard": shard,
        }
        wrong = {k: payload.get(k) for k, v in expected.items() if payload.get(k) != v}
        if payload.get("format") != 1 or wrong:
            raise ExperimentError(
                [f"{path}: progress of another run ({wrong}); delete it to redo {target.name}"]
            )
        logger.info("%s: resuming at image %d of %d of this process", target.name, payload["position"], shard)
        return _TargetProgress(
            position=int(payload["position"]),
            confusion=dict(payload["confusion"]),
            num_images={k: int(v) for k, v in payload["num_images"].items()},
            embeddings=payload["embeddings"],
        )

    def finish_target(self, target: TargetPlan) -> None:
        self._progress_file(target).unlink(missing_ok=True)


def _image_weights(
    record: Mapping[str, Any], row: torch.Tensor, names: Sequence[str], root: Path
) -> ImageWeights:
    """The kept adapters of one image (weight > 0), best first (ties in library order)."""
    order = torch.sort(-row, stable=True).indices
    kept = [int(i) for i in order if row[i] > 0]
    file_name = Path(record["file_name"])
    try:
        image = file_name.relative_to(root).as_posix()
    except ValueError:
        image = file_name.as_posix()
    return ImageWeights(image, tuple(names[i] for i in kept), tuple(float(row[i]) for i in kept))


def _shard(num_images: int, batch_size: int, info: DistInfo) -> tuple[int, int]:
    """This process's contiguous share of a target's images, in whole batches.

    The images are cut into batches first and the batches are shared out (detectron2's split: the first
    ranks get one more), so every image is predicted in the same batch whatever the number of
    processes, and the outputs equal a one-process run.
    """
    sampler = InferenceSampler(math.ceil(num_images / batch_size), rank=info.rank, world_size=info.world_size)
    return min(sampler.begin * batch_size, num_images), min(sampler.end * batch_size, num_images)


def _configure_threads(device: torch.device, world_size: int) -> None:
    if device.type == "cpu" and world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def run(plan: ExperimentPlan, info: DistInfo | None = None) -> ResultsBook | None:
    """Run a prepared plan in this process (every process of a distributed run calls it).

    Rank 0 writes ``run_config.json`` first, then the outputs after each target (see
    :mod:`domain_orchestrator.reporting`), and prints the summary table at the end.

    Returns:
        the results on rank 0, None on the other ranks.
    """
    info = info or DistInfo()
    settings = plan.settings
    device = resolve_device(settings.device, local_rank=info.local_rank, num_processes=info.world_size)
    _configure_threads(device, info.world_size)
    output_dir = plan.output_dir
    book = None
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if settings.overwrite and not settings.resume:
            import shutil

            shutil.rmtree(output_dir / PROGRESS_DIR, ignore_errors=True)
        book = (
            ResultsBook.load(
                output_dir,
                experiments=plan.experiments,
                targets=[t.name for t in plan.targets],
                sources=plan.sources,
            )
            if settings.resume
            else ResultsBook(plan.experiments, [t.name for t in plan.targets], plan.sources)
        )
    barrier()
    session = _Session(plan, device, info)
    if info.is_main:
        _write_run_config(plan, session, device, info)
        logger.info(
            "experiments %s on %d target(s), %d source(s), %s, %d process(es)",
            ", ".join(plan.experiments),
            len(plan.targets),
            len(plan.sources),
            device,
            info.world_size,
        )
    for target in plan.targets:
        if target.name in plan.finished:
            logger.info("%s: finished in an earlier run, skipped", target.name)
            continue
        metrics, image_weights, uniform = session.run_target(target)
        if info.is_main:
            book.add_target(
                target.name,
                metrics,
                semla=image_weights if "semla" in plan.experiments else None,
                uniform=uniform if "uniform" in plan.experiments else None,
            )
            book.write(output_dir)
        barrier()  # outputs written before any process drops its progress file
        session.finish_target(target)
    if info.is_main:
        print(format_summary(book), flush=True)
        print(f"results written to {output_dir}", flush=True)
    return book


def _write_run_config(plan: ExperimentPlan, session: _Session, device: torch.device, info: DistInfo) -> None:
    from cat_seg.engine.io import atomic_write_json

    library = next(iter(session.libraries.values()), None)
    data = collect_run_info(argv=plan.settings.argv, device=device, world_size=info.world_size, seed=0)
    data.pop("seed")
    data.update(
        {
            "experiments": plan.experiments,
            "sources": plan.sources,
            "targets": [t.name for t in plan.targets],
            "semla_config": plan.semla.as_dict(),
            "text_features": plan.settings.text_features,
            "remove_target_adapter": plan.settings.remove_target_adapter,
            "model_weights": str(plan.model_weights),
            "lora_library_path": str(plan.library_path),
            "adapters": []
            if library is None
            else [
                {
                    "name": i.name,
                    "r": i.rank,
                    "lora_alpha": i.alpha,
                    "scaling": i.scaling,
                    "folder": str(i.folder),
                    "reference_training": i.reference_training,
                }
                for i in library.infos
            ],
            "embedding_model": plan.settings.embedding_model,
            "embedder": session.embedder.identity if session.embedder is not None else None,
            "datasets_root": str(plan.datasets_root),
            "config_overlays": [str(p) for p in plan.settings.config_overlays],
            "opts": list(plan.settings.opts),
            "batch_size": plan.settings.batch_size,
            "fingerprint": plan.fingerprint,
        }
    )
    atomic_write_json(plan.output_dir / RUN_CONFIG_FILE, data)
