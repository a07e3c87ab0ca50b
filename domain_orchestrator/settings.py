"""What an experiment run is asked to do: the experiment names, ``semla_config.yaml`` and the command line.

:class:`SemlaConfig` (read by :func:`load_semla_config`) holds SemLA's retrieval settings;
:class:`ExperimentSettings` the command line of ``experiments.py`` as given. Nothing here reads data or
builds a model; :mod:`domain_orchestrator.plan` checks the settings against the files.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cat_seg.fileio import read_yaml

__all__ = [
    "COMBINATION_TYPES",
    "EXPERIMENTS",
    "EXPERIMENT_OPTS",
    "TEXT_POLICIES",
    "ExperimentError",
    "ExperimentSettings",
    "SemlaConfig",
    "embedding_model_problem",
    "is_semla",
    "load_semla_config",
    "semla_column",
]

#: The experiments of SemLA's main table, in the order of ``experiments.py --experiment``.
EXPERIMENTS = ("zeroshot", "oracle", "uniform", "semla")
TEXT_POLICIES = ("per_image", "reference")
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
#: PEFT ``add_weighted_adapter``'s options besides the type (its names), and ``seed`` (DARE's masks; ours).
MERGE_KEYS = (
    "svd_rank",
    "svd_clamp",
    "svd_full_matrices",
    "svd_driver",
    "density",
    "majority_sign_method",
    "seed",
)
_SEMLA_KEYS = (*_MEASURE_KEYS, "temperature", "top_k", "combination_type", *MERGE_KEYS)

#: PEFT ``add_weighted_adapter``'s combination types (PEFT 0.21), all of which fusion implements exactly.
COMBINATION_TYPES = (
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)


@dataclass(frozen=True)
class SemlaConfig:
    """SemLA's retrieval settings (the original's defaults).

    Attributes:
        measure: ``euclidean`` (score 1 / distance, the original's effective choice) or ``cosine``
            (cosine similarity; the original's cosine option used the distance and picked the farthest
            domains).
        temperature: softmax temperature, > 0.
        top_k: adapters kept per image, >= 1 (all candidates when fewer).
        combination_type: how the kept adapters are fused, one of :data:`COMBINATION_TYPES` (PEFT
            ``add_weighted_adapter``'s; ``cat``, the original's setting, is the exact weighted sum of deltas).
        merge: PEFT's other options of that call, as given (``svd_rank``, ``svd_clamp``,
            ``svd_full_matrices``, ``svd_driver``, ``density``, ``majority_sign_method``) and ``seed`` (DARE).
    """

    measure: str = "euclidean"
    temperature: float = 0.05
    top_k: int = 5
    combination_type: str = "cat"
    merge: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "distance_measure_name": self.measure,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "combination_type": self.combination_type,
            **dict(self.merge),
        }

    def combination(self) -> Any:
        """The :class:`~domain_orchestrator.merging.CombinationSpec` of a merging type (None for ``cat``)."""
        if self.combination_type == "cat":
            return None
        from .merging import CombinationSpec

        return CombinationSpec(self.combination_type, **dict(self.merge))


def load_semla_config(path: str | os.PathLike | None) -> SemlaConfig:
    """Read and check ``semla_config.yaml``; None gives the defaults.

    Raises:
        FileNotFoundError: the file does not exist.
        ExperimentError: every problem: unknown keys (with a "did you mean"), wrong types or values,
            both measure keys with different values, an unknown combination type or a bad merge option.
    """
    if path is None:
        return SemlaConfig()
    path = Path(path)
    data = read_yaml(path, what="SemLA config file", error=lambda m: ExperimentError([m]))
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
    if combination not in COMBINATION_TYPES:
        problems.append(
            f"{path}: combination_type {combination!r} is not one of PEFT's: {', '.join(COMBINATION_TYPES)}"
        )
    merge = {k: data[k] for k in MERGE_KEYS if k in data}
    problems += [f"{path}: {p}" for p in _merge_problems(combination, merge)]
    if problems:
        raise ExperimentError(problems)
    return SemlaConfig(
        measure=measure,
        temperature=float(temperature),
        top_k=int(top_k),
        combination_type=combination,
        merge=tuple(merge.items()),
    )


def _merge_problems(combination: str, merge: dict[str, Any]) -> list[str]:
    """The type and range problems of PEFT's merge options (PEFT's own refusals: see merging.check_combination)."""
    problems = []
    if merge and combination == "cat":
        problems.append(f"{', '.join(merge)} do(es) nothing with combination_type cat")

    def number(key: str, low: float, high: float | None, integer: bool = False) -> None:
        value = merge.get(key)
        if value is None:
            return
        kinds = (int,) if integer else (int, float)
        bad = isinstance(value, bool) or not isinstance(value, kinds) or value < low
        if bad or (high is not None and value > high) or (not integer and not math.isfinite(value)):
            limit = f"in [{low}, {high}]" if high is not None else f">= {low}"
            problems.append(f"{key} must be {'an integer' if integer else 'a number'} {limit}, got {value!r}")

    number("svd_rank", 1, None, integer=True)
    number("svd_clamp", 0, 1)
    number("density", 0, 1)
    number("seed", 0, None, integer=True)
    if not isinstance(merge.get("svd_full_matrices", True), bool):
        problems.append(f"svd_full_matrices must be true or false, got {merge['svd_full_matrices']!r}")
    if merge.get("svd_driver") not in (None, "gesvd", "gesvdj", "gesvda"):
        problems.append(
            f"svd_driver must be gesvd, gesvdj or gesvda (CUDA only), got {merge['svd_driver']!r}"
        )
    if merge.get("majority_sign_method", "total") not in ("total", "frequency"):
        problems.append(
            f"majority_sign_method must be total or frequency, got {merge['majority_sign_method']!r}"
        )
    if "density" not in merge and combination.startswith(("ties", "dare", "magnitude_prune")):
        problems.append(
            f"combination_type {combination} needs a density (the fraction of values kept, in (0, 1])"
        )
    return problems


@dataclass(frozen=True)
class ExperimentSettings:
    """What the command line asks for (paths as given).

    Attributes:
        experiments: subset of :data:`EXPERIMENTS`, in the order to report them.
        source_domains, target_domains: YAML lists of domains (names, or domain spec files).
        domain_specs: a folder of domain specs (``*.yaml``) to register before reading the lists.
        semla_config: YAML of :class:`SemlaConfig` keys, or None for the defaults.
        semla_configs: several such files (ablations): each is its own ``semla-<file stem>`` column, all
            sharing the model, the data and each image's embedding (``semla_config`` is then None).
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
        save_every: seconds between saves of the resume state inside a target (0: after every batch).
        progress: show a progress bar or progress lines.
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
    semla_configs: tuple[Path, ...] = ()
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


def embedding_model_problem(spec: str) -> str | None:
    """Why ``--embedding_model spec`` cannot be loaded, as far as it shows without loading it, or None.

    ``catseg`` and ``open_clip:<model>:<checkpoint>`` are checked when loaded; anything else names a folder.
    """
    if spec == "catseg" or spec.startswith("open_clip:") or Path(spec).expanduser().exists():
        return None
    return f"--embedding_model {spec}: no such folder"


def is_semla(experiment: str) -> bool:
    """``semla`` or one of its ablation columns ``semla-<stem>``."""
    return experiment == "semla" or experiment.startswith("semla-")


def semla_column(path: str | os.PathLike) -> str:
    """The column of a SemLA config among several: ``semla-<file stem>``."""
    return f"semla-{Path(path).stem}"
