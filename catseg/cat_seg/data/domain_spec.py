"""Domain specs: a dataset of your own, with its own classes, usable wherever a built-in domain is.

A domain spec is a small YAML file::

    name: floods                    # the domain: datasets floods_sem_seg_train / floods_sem_seg_val
    classes: floods_classes.json    # JSON list of class names; entry i is label id i
    ignore_label: 255               # label id that is not evaluated nor trained on (default 255)
    metric: detectron2              # or cityscapes (docs/evaluation.md; default detectron2)
    config: null                    # base config of its adapter (default: catseg/configs/own_domain.yaml)
    train:
      images: floods/train/images   # a folder (searched recursively) or a glob such as floods/train/*/*.jpg
      labels: floods/train/labels   # label of <images>/<sub>/<X><image_suffix>: <labels>/<sub>/<X><label_suffix>
      image_suffix: .jpg            # one suffix or a list (default: .jpg, .jpeg, .png)
      label_suffix: .png            # default .png
    val:
      images: floods/val/images
      labels: floods/val/labels

Relative paths are relative to the spec file's folder (``~`` and ``$VARIABLES`` such as
``$DETECTRON2_DATASETS`` are expanded; the ``config`` also falls back to ``catseg/``). At least one of
``train`` / ``val`` is needed: a spec with ``val`` only is a target that can be evaluated but has no
adapter. Label maps are 8-bit PNGs of class ids ``0 .. len(classes) - 1`` plus ``ignore_label``.

:func:`register_domain_spec` adds the domain's datasets to :mod:`cat_seg.data.registry`, in this
process; ``load_config`` registers the specs a config names (``DATASETS.SPECS``), and a spec file given
where a config file is expected becomes the config of its domain (:func:`spec_config_opts`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..fileio import read_yaml

__all__ = [
    "DEFAULT_BASE_CONFIG",
    "DomainSpec",
    "DomainSpecError",
    "SplitSpec",
    "is_domain_spec_file",
    "load_domain_spec",
    "spec_config_opts",
]

CATSEG_DIR = Path(__file__).resolve().parents[2]
DEFAULT_BASE_CONFIG = CATSEG_DIR / "configs" / "own_domain.yaml"
"""The base config of a spec's adapter when the spec names none (the road-scene adapters' recipe)."""

DEFAULT_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_TOP_KEYS = ("name", "classes", "ignore_label", "metric", "config", "train", "val")
_SPLIT_KEYS = ("images", "labels", "image_suffix", "label_suffix")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_GLOB_CHARS = re.compile(r"[*?\[]")


class DomainSpecError(ValueError):
    """A domain spec that cannot be used; the message names the file and every problem found."""


@dataclass(frozen=True)
class SplitSpec:
    """Where one split's images and labels are (absolute paths).

    Attributes:
        images: a folder (searched recursively) or a glob pattern.
        labels: the folder of the label PNGs, mirroring the image folder's sub-folders.
        image_suffixes: the endings of image file names, replaced by ``label_suffix`` for the label.
        label_suffix: the ending of label file names.
    """

    images: str
    labels: str
    image_suffixes: tuple[str, ...] = DEFAULT_IMAGE_SUFFIXES
    label_suffix: str = ".png"

    @property
    def is_glob(self) -> bool:
        return bool(_GLOB_CHARS.search(self.images))

    @property
    def image_dir(self) -> Path:
        """The folder the image paths are relative to (a glob's part before its first wildcard)."""
        if not self.is_glob:
            return Path(self.images)
        parts = Path(self.images).parts
        fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))]]
        return Path(*fixed)


@dataclass(frozen=True)
class DomainSpec:
    """One domain of your own (see the module docstring for the YAML).

    Attributes:
        name: the domain name (letters, digits, ``_`` and ``-``; it names the adapter folder too).
        path: the spec file (absolute).
        class_json: the class-name JSON (absolute).
        class_names: its names (index = label id).
        ignore_label: the label id left out of training and evaluation.
        metric: ``detectron2`` or ``cityscapes``.
        config: the base config of the domain's adapter (absolute).
        splits: ``(split, SplitSpec)`` pairs for ``train`` and/or ``val``.
    """

    name: str
    path: Path
    class_json: Path
    class_names: tuple[str, ...]
    ignore_label: int
    metric: str
    config: Path
    splits: tuple[tuple[str, SplitSpec], ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, split: str) -> SplitSpec | None:
        return dict(self.splits).get(split)

    def dataset(self, split: str) -> str:
        """The registered dataset name of a split: ``<name>_sem_seg_<split>``."""
        return f"{self.name}_sem_seg_{split}"


def _expand(value: str) -> str:
    expanded = os.path.expanduser(os.path.expandvars(value))
    missing = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if missing:
        raise ValueError(f"environment variable ${missing[0]} is not set")
    return expanded


def _path(value: Any, base: Path, key: str, problems: list[str]) -> Path | None:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{key} must be a path (a non-empty string), got {value!r}")
        return None
    try:
        path = Path(_expand(value))
    except ValueError as e:
        problems.append(f"{key} {value!r}: {e}")
        return None
    return path if path.is_absolute() else base / path


def _suffixes(value: Any, key: str, default: tuple[str, ...], problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return default
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        problems.append(f"{key} must be a file-name ending or a list of them (e.g. .jpg), got {value!r}")
        return default
    return tuple(values)


def _read_classes(path: Path, problems: list[str]) -> tuple[str, ...]:
    if not path.is_file():
        problems.append(f"classes: class-name file {path} not found")
        return ()
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        problems.append(f"classes: {path} is not valid JSON ({e})")
        return ()
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        problems.append(f"classes: {path} must hold a non-empty JSON list of class names (strings)")
        return ()
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"classes: {path} repeats {', '.join(repeated)}")
    if len(names) > 255:
        problems.append(f"classes: {path} has {len(names)} classes; 8-bit label maps hold at most 255")
    return tuple(names)


def _config_path(value: Any, base: Path, problems: list[str]) -> Path:
    if value is None:
        return DEFAULT_BASE_CONFIG
    path = _path(value, base, "config", problems)
    if path is None:
        return DEFAULT_BASE_CONFIG
    if not path.is_file():
        fallback = CATSEG_DIR / str(value)
        if not Path(str(value)).is_absolute() and fallback.is_file():
            return fallback
        problems.append(f"config: base config {value} not found (looked at {path} and {fallback})")
    return path


def is_domain_spec_file(path: str | os.PathLike) -> bool:
    """Whether a YAML file is a domain spec (a mapping with ``name`` and ``classes``, no config keys)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "name" in data and "classes" in data and "MODEL" not in data


def load_domain_spec(path: str | os.PathLike) -> DomainSpec:
    """Read and check a domain spec file.

    Raises:
        FileNotFoundError: the file does not exist.
        DomainSpecError: naming the file and every problem (unknown keys, missing class file, bad name, a
            built-in domain's name, no split, ...).
    """
    from .registry import DOMAINS

    path = Path(path).expanduser().absolute()
    data = read_yaml(path, what="domain spec", error=lambda m: DomainSpecError(f"domain spec {m}"))
    if not isinstance(data, dict):
        raise DomainSpecError(f"domain spec {path}: expected a YAML mapping with name, classes, train/val")
    base = path.parent
    problems: list[str] = []
    unknown = [str(k) for k in data if k not in _TOP_KEYS]
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(_TOP_KEYS)})")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or "_sem_seg_" in name:
        problems.append(
            f"name must be letters, digits, '_' or '-' (it names the datasets <name>_sem_seg_<split> and the "
            f"adapter folder), got {name!r}"
        )
    elif name in DOMAINS:
        problems.append(f"name {name!r} is a built-in domain; give your domain another name")
    classes: tuple[str, ...] = ()
    class_json = _path(data.get("classes"), base, "classes", problems) if "classes" in data else None
    if "classes" not in data:
        problems.append("classes is required (a JSON file listing the class names; entry i = label id i)")
    elif class_json is not None:
        classes = _read_classes(class_json, problems)
    ignore = data.get("ignore_label", 255)
    if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= 255:
        problems.append(f"ignore_label must be an integer in 0..255, got {ignore!r}")
    elif classes and ignore < len(classes):
        problems.append(
            f"ignore_label {ignore} is the id of class {classes[ignore]!r}; use an id >= {len(classes)}"
        )
    metric = data.get("metric", "detectron2")
    if metric not in ("detectron2", "cityscapes"):
        problems.append(f"metric must be detectron2 or cityscapes, got {metric!r}")
    config = _config_path(data.get("config"), base, problems)
    splits: list[tuple[str, SplitSpec]] = []
    for split in ("train", "val"):
        if data.get(split) is None:
            continue
        entry = data[split]
        if not isinstance(entry, dict):
            problems.append(f"{split} must be a mapping with images and labels")
            continue
        unknown = [str(k) for k in entry if k not in _SPLIT_KEYS]
        if unknown:
            problems.append(f"{split}: unknown key(s) {', '.join(unknown)} (known: {', '.join(_SPLIT_KEYS)})")
        images = _path(entry.get("images"), base, f"{split}.images", problems)
        labels = _path(entry.get("labels"), base, f"{split}.labels", problems)
        image_suffixes = _suffixes(
            entry.get("image_suffix"), f"{split}.image_suffix", DEFAULT_IMAGE_SUFFIXES, problems
        )
        label_suffix = _suffixes(entry.get("label_suffix"), f"{split}.label_suffix", (".png",), problems)
        if len(label_suffix) != 1:
            problems.append(f"{split}.label_suffix must be one ending, got {label_suffix}")
        if images is not None and labels is not None:
            splits.append((split, SplitSpec(str(images), str(labels), image_suffixes, label_suffix[0])))
    if not any(k in data for k in ("train", "val")):
        problems.append("no split: give train and/or val (each with images and labels folders)")
    if problems:
        raise DomainSpecError(f"domain spec {path}: " + "; ".join(problems))
    assert isinstance(name, str) and class_json is not None
    return DomainSpec(
        name=name,
        path=path,
        class_json=class_json,
        class_names=classes,
        ignore_label=int(ignore),
        metric=str(metric),
        config=config,
        splits=tuple(splits),
    )


def spec_config_opts(spec: DomainSpec) -> list[Any]:
    """``KEY VALUE`` overrides that make a base config the config of ``spec``'s domain.

    ``DATASETS.SPECS`` (so that every process registers the spec), ``DATASETS.TRAIN`` / ``TEST`` (its
    splits), both class JSONs, ``NUM_CLASSES`` and ``IGNORE_VALUE``.
    """
    opts: list[Any] = ["DATASETS.SPECS", [str(spec.path)]]
    opts += ["DATASETS.TRAIN", (spec.dataset("train"),) if spec.split("train") else ()]
    opts += ["DATASETS.TEST", (spec.dataset("val"),) if spec.split("val") else ()]
    opts += ["MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON", str(spec.class_json)]
    opts += ["MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", str(spec.class_json)]
    opts += ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", spec.num_classes]
    opts += ["MODEL.SEM_SEG_HEAD.IGNORE_VALUE", spec.ignore_label]
    return opts


def describe(spec: DomainSpec) -> Mapping[str, Any]:
    """A JSON-friendly summary (for run records)."""
    return {
        "name": spec.name,
        "spec": str(spec.path),
        "classes": list(spec.class_names),
        "ignore_label": spec.ignore_label,
        "metric": spec.metric,
        "splits": {s: {"images": p.images, "labels": p.labels} for s, p in spec.splits},
    }


def find_spec_files(folder: str | os.PathLike) -> Sequence[Path]:
    """The ``*.yaml`` / ``*.yml`` files of a folder (sorted), for ``--domain_specs DIR``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"folder of domain specs {folder} not found")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no domain spec (*.yaml) in {folder}")
    return files
