"""The output files of ``experiments.py`` and the printed summary table.

Layout of ``--output_dir`` (every file written atomically, rewritten after each finished target):

- with one experiment, the files of the original code in the folder itself; with several, one
  sub-folder per experiment (``zeroshot/``, ``oracle/``, ``uniform/``, ``semla/``) holding them:

  - ``results.json``: ``{target: value}``, the number SemLA reports (``IoU`` for the Cityscapes-family
    domains, ``mIoU`` otherwise, in percent), targets in the order of the target list;
  - ``weights.json`` (uniform and semla): uniform ``{target: {source: weight}}`` (the original's
    shape); semla ``{target: {image: {"adapters": [...], "weights": [...]}}}``, per image (its path
    relative to the dataset root) the adapters kept, best first, and their weights;
  - ``weights_reference.json`` (semla): the original's ``{source: [weight, ...]}`` lists, one weight
    appended per image where the source was kept, over all targets in order (for existing scripts);

- always at the top: ``metrics.json`` ``{target: {experiment: {every metric}}}``, ``summary.txt`` (the
  table printed at the end) and ``run_config.json`` (written by the orchestrator).

JSON files of the original's shapes use its ``indent=4``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cat_seg.engine.io import atomic_write_json, to_json
from cat_seg.fileio import atomic_write_text

from .settings import is_semla

__all__ = [
    "METRICS_FILE",
    "RESULTS_FILE",
    "RUN_CONFIG_FILE",
    "SUMMARY_FILE",
    "WEIGHTS_FILE",
    "WEIGHTS_REFERENCE_FILE",
    "ImageWeights",
    "ResultsBook",
    "experiment_dir",
    "format_summary",
    "reported_value",
]

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "weights.json"
WEIGHTS_REFERENCE_FILE = "weights_reference.json"
SUMMARY_FILE = "summary.txt"
RUN_CONFIG_FILE = "run_config.json"


@dataclass(frozen=True)
class ImageWeights:
    """The adapters one image was predicted with: names best first, and their weights."""

    image: str
    adapters: tuple[str, ...]
    weights: tuple[float, ...]


def reported_value(metrics: Mapping[str, Any]) -> tuple[str, float | None]:
    """The original's ``_get_result_from_dict``: ``IoU`` if present, else ``mIoU``, else None."""
    for key in ("IoU", "mIoU"):
        if key in metrics:
            return key, float(metrics[key])
    return "mIoU", None


def experiment_dir(output_dir: str | os.PathLike, experiment: str, experiments: Sequence[str]) -> Path:
    """Where an experiment's own files go: the output folder itself when it is the only experiment."""
    return Path(output_dir) if len(experiments) == 1 else Path(output_dir) / experiment


def _write_original_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(to_json(data), indent=4))


@dataclass
class ResultsBook:
    """Everything the output files hold, kept in memory and rewritten after each target.

    Attributes:
        experiments: in the order given on the command line.
        targets: every target of the run, in order (finished or not).
        sources: the source domains, in order.
        metrics: ``{target: {experiment: metrics}}`` of the finished targets.
        semla: ``{column: {target: [ImageWeights, ...]}}`` in image order (column ``semla``, or
            ``semla-<stem>`` for each of several SemLA configs).
        uniform: ``{target: {source: weight}}``.
    """

    experiments: list[str]
    targets: list[str]
    sources: list[str]
    metrics: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    semla: dict[str, dict[str, list[ImageWeights]]] = field(default_factory=dict)
    uniform: dict[str, dict[str, float]] = field(default_factory=dict)

    # -- filling -----------------------------------------------------------------------------------
    def add_target(
        self,
        target: str,
        metrics: Mapping[str, Mapping[str, Any]],
        *,
        semla: Sequence[ImageWeights] | Mapping[str, Sequence[ImageWeights]] | None = None,
        uniform: Mapping[str, float] | None = None,
    ) -> None:
        """Record a finished target (every experiment's metrics and, where there are, its weights).

        ``semla``: the images' weights of the ``semla`` column, or ``{column: weights}`` for several.
        """
        missing = [e for e in self.experiments if e not in metrics]
        if missing:
            raise ValueError(f"target {target!r}: no metrics for {missing}")
        self.metrics[target] = {e: dict(metrics[e]) for e in self.experiments}
        if semla is not None:
            per_column = semla if isinstance(semla, Mapping) else {"semla": semla}
            for column, weights in per_column.items():
                self.semla.setdefault(column, {})[target] = list(weights)
        if uniform is not None:
            self.uniform[target] = dict(uniform)

    def finished(self) -> list[str]:
        """Targets with every experiment's metrics, in target order."""
        return [t for t in self.targets if t in self.metrics]

    # -- the files ---------------------------------------------------------------------------------
    def results(self, experiment: str) -> dict[str, float | None]:
        """``results.json`` of one experiment: ``{target: value}`` for the finished targets."""
        return {t: reported_value(self.metrics[t][experiment])[1] for t in self.finished()}

    def semla_weights(self, column: str = "semla") -> dict[str, dict[str, dict[str, list]]]:
        """``weights.json`` of a semla column: ``{target: {image: {"adapters": [...], "weights": [...]}}}``."""
        per_target = self.semla.get(column, {})
        return {
            t: {w.image: {"adapters": list(w.adapters), "weights": list(w.weights)} for w in per_target[t]}
            for t in self.finished()
            if t in per_target
        }

    def semla_weights_reference(self, column: str = "semla") -> dict[str, list[float]]:
        """The original's flat lists: one weight per image where the source was kept, all targets."""
        flat: dict[str, list[float]] = {}
        for t in self.finished():
            for image in self.semla.get(column, {}).get(t, []):
                for name, weight in zip(image.adapters, image.weights):
                    flat.setdefault(name, []).append(weight)
        return flat

    def write(self, output_dir: str | os.PathLike) -> None:
        """Write every output file (atomically each)."""
        output_dir = Path(output_dir)
        for experiment in self.experiments:
            folder = experiment_dir(output_dir, experiment, self.experiments)
            _write_original_json(folder / RESULTS_FILE, self.results(experiment))
            if experiment == "uniform":
                uniform = {t: self.uniform[t] for t in self.finished() if t in self.uniform}
                _write_original_json(folder / WEIGHTS_FILE, uniform)
            if is_semla(experiment):
                _write_original_json(folder / WEIGHTS_FILE, self.semla_weights(experiment))
                _write_original_json(
                    folder / WEIGHTS_REFERENCE_FILE, self.semla_weights_reference(experiment)
                )
        atomic_write_json(output_dir / METRICS_FILE, {t: self.metrics[t] for t in self.finished()})
        atomic_write_text(output_dir / SUMMARY_FILE, format_summary(self) + "\n")

    @classmethod
    def load(
        cls,
        output_dir: str | os.PathLike,
        *,
        experiments: Sequence[str],
        targets: Sequence[str],
        sources: Sequence[str],
    ) -> ResultsBook:
        """Read back what :meth:`write` wrote (to resume a run); missing files mean no finished target."""
        output_dir = Path(output_dir)
        book = cls(list(experiments), list(targets), list(sources))
        path = output_dir / METRICS_FILE
        if not path.is_file():
            return book
        metrics = json.loads(path.read_text(encoding="utf-8"))
        for target, per_experiment in metrics.items():
            if target in book.targets and all(e in per_experiment for e in book.experiments):
                book.metrics[target] = {e: per_experiment[e] for e in book.experiments}
        for experiment in book.experiments:
            if experiment != "uniform" and not is_semla(experiment):
                continue
            weights_path = experiment_dir(output_dir, experiment, book.experiments) / WEIGHTS_FILE
            weights = json.loads(weights_path.read_text(encoding="utf-8")) if weights_path.is_file() else {}
            for target in book.finished():
                if target not in weights:
                    raise ValueError(f"{weights_path}: no weights of finished target {target!r}")
                if experiment == "uniform":
                    book.uniform[target] = {k: float(v) for k, v in weights[target].items()}
                else:
                    book.semla.setdefault(experiment, {})[target] = [
                        ImageWeights(
                            image, tuple(entry["adapters"]), tuple(float(w) for w in entry["weights"])
                        )
                        for image, entry in weights[target].items()
                    ]
        return book


def format_summary(book: ResultsBook) -> str:
    """The main table: one row per target, one column per experiment, and the mean over targets.

    Each cell is the reported value (``IoU`` for the Cityscapes family, else ``mIoU``), in percent.
    Columns are 10 characters wide, wider for long names (``semla-<stem>`` ablation columns).
    """
    experiments = book.experiments
    cw = {e: max(10, len(e) + 2) for e in experiments}
    width = max([len("target"), len("mean")] + [len(t) for t in book.targets]) + 2
    header = f"{'target':<{width}}{'metric':<8}" + "".join(f"{e:>{cw[e]}}" for e in experiments)
    lines = [header, "-" * len(header)]
    columns: dict[str, list[float]] = {e: [] for e in experiments}
    for target in book.targets:
        if target not in book.metrics:
            lines.append(f"{target:<{width}}{'-':<8}" + "".join(f"{'-':>{cw[e]}}" for e in experiments))
            continue
        key = reported_value(book.metrics[target][experiments[0]])[0]
        cells = []
        for e in experiments:
            value = reported_value(book.metrics[target][e])[1]
            if value is not None and math.isfinite(value):
                columns[e].append(value)
            cells.append(f"{value:>{cw[e]}.2f}" if value is not None else f"{'n/a':>{cw[e]}}")
        lines.append(f"{target:<{width}}{key:<8}" + "".join(cells))
    lines.append("-" * len(header))
    means = []
    for e in experiments:
        values = columns[e]
        means.append(f"{sum(values) / len(values):>{cw[e]}.2f}" if values else f"{'-':>{cw[e]}}")
    done = len(book.finished())
    lines.append(f"{'mean':<{width}}{'':<8}" + "".join(means))
    if done < len(book.targets):
        lines.append(f"({done} of {len(book.targets)} targets finished; the mean is over those)")
    return "\n".join(lines)
