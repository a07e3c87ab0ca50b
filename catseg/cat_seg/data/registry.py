"""Registry of the datasets behind the 20 SemLA domains, and of your own: name -> ``DatasetSpec``.

The built-in registry is a plain read-only mapping built by ``build_registry()`` (no I/O, no environment
reads); nothing is registered anywhere at import. Domains of your own are added per process by
``register_domain_spec`` (see :mod:`cat_seg.data.domain_spec`). The dataset root is always an argument; ``default_root``
reads ``$DETECTRON2_DATASETS`` and is meant to be called from a CLI ``main`` only.

Dataset names are the original's: ``f"{domain}_sem_seg_{split}"`` with split ``train`` or ``val``
(``acdc-rain_sem_seg_val``, ``muses-clear-day_sem_seg_train``, ``coconutL_sem_seg_val``...).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from .layouts import ACDC_CONDITIONS, MUSES_TIMES, MUSES_WEATHERS, SCANNERS, SPLITS, Scan, records_from_scan

CATSEG_DIR = Path(__file__).resolve().parents[2]
"""The ``catseg/`` folder; class-name JSON paths (``datasets/cs19.json``) are relative to it."""

MetricConvention = Literal["cityscapes", "detectron2"]

_CS_TRAINIDS = "8-bit PNG of Cityscapes trainIds 0-18, 255 = ignore"


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the code needs to know about one registered dataset.

    Attributes:
        name: registered name, ``<domain>_sem_seg_<split>``.
        domain: SemLA domain name (``acdc-rain``, ``mv``, ...).
        split: ``train`` or ``val``.
        layout: on-disk layout family (key of ``layouts.SCANNERS`` and of the synthetic writers).
        layout_kwargs: extra scanner arguments (ACDC condition, MUSES weather/time), as sorted pairs.
        class_json: class-name list, relative to ``catseg/``; entry i is train id i.
        num_classes: length of that list = model output channels.
        ignore_label: id excluded from training and evaluation (255; 65 for Mapillary Vistas).
        label_format: how the training/evaluation label PNGs encode classes.
        eval_label_kind: which ids the label maps returned by the loader hold.
        metric_convention: ``cityscapes`` (a class absent from the ground truth but predicted scores IoU 0;
            cityscapesScripts) or ``detectron2`` (mean over classes present in the ground truth).
        evaluator_type: the original's ``MetadataCatalog`` ``evaluator_type``.
        resize_to: (width, height) to which image and label are resized with nearest interpolation before
            any other transform (cs-normal: 1024x512), or None.

    ``loader(root)`` returns the records, ``scanner(root)`` what is on disk (both are properties).
    """

    name: str
    domain: str
    split: str
    layout: str
    layout_kwargs: tuple[tuple[str, Any], ...]
    class_json: str
    num_classes: int
    ignore_label: int
    label_format: str
    eval_label_kind: str
    metric_convention: MetricConvention
    evaluator_type: str
    resize_to: tuple[int, int] | None = None

    @property
    def scanner(self) -> Callable[[Path], Scan]:
        """``scanner(root) -> Scan``: what is on disk for this dataset, without raising."""
        return partial(SCANNERS[self.layout], split=self.split, dataset=self.name, **dict(self.layout_kwargs))

    @property
    def loader(self) -> Callable[[Path], list[dict[str, Any]]]:
        """``loader(root) -> records`` (sorted; height/width from the image headers); raises on problems."""
        return partial(_load, self.scanner)

    @property
    def class_json_path(self) -> Path:
        """Absolute path of the class-name JSON (inside the repository's ``catseg/``)."""
        return CATSEG_DIR / self.class_json

    def class_names(self) -> list[str]:
        """The class names, read from ``class_json_path`` (index = train id)."""
        path = self.class_json_path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: class-name list of dataset {self.name!r} not found")
        names = json.loads(path.read_text())
        if not isinstance(names, list) or len(names) != self.num_classes:
            raise ValueError(f"{path}: expected a list of {self.num_classes} class names for {self.name!r}")
        return names


def _load(scanner: Callable[[Path], Scan], root: Path) -> list[dict[str, Any]]:
    return records_from_scan(scanner(Path(root)))


@dataclass(frozen=True)
class _DomainInfo:
    layout: str
    layout_kwargs: tuple[tuple[str, Any], ...]
    class_json: str
    num_classes: int
    ignore_label: int
    label_format: str
    eval_label_kind: str
    metric_convention: MetricConvention
    evaluator_type: str
    resize_to: tuple[int, int] | None = None


def _domain_table() -> dict[str, _DomainInfo]:
    """Domain name -> facts, in the order of the paper's source-domain list (as in the original SemLA code)."""
    cs = dict(
        class_json="datasets/cs19.json",
        num_classes=19,
        ignore_label=255,
        eval_label_kind="trainIds",
    )
    table: dict[str, _DomainInfo] = {}
    for c in ACDC_CONDITIONS:
        table[f"acdc-{c}"] = _DomainInfo(
            "acdc",
            (("condition", c),),
            label_format=_CS_TRAINIDS + " (*_gt_labelTrainIds.png); *_gt_labelIds.png beside it",
            metric_convention="cityscapes",
            evaluator_type="acdc_sem_seg",
            **cs,
        )
    for w in MUSES_WEATHERS:
        for t in MUSES_TIMES:
            table[f"muses-{w}-{t}"] = _DomainInfo(
                "muses",
                (("time", t), ("weather", w)),
                label_format=_CS_TRAINIDS + " (*_gt_labelTrainIds.png); *_gt_labelIds.png beside it",
                metric_convention="cityscapes",
                evaluator_type="muses_sem_seg",
                **cs,
            )
    table["cs-normal"] = _DomainInfo(
        "cityscapes",
        (),
        label_format=_CS_TRAINIDS + " (*_gtFine_labelTrainIds.png); *_gtFine_labelIds.png beside it",
        metric_convention="cityscapes",
        evaluator_type="resized_cityscapes_sem_seg",
        resize_to=(1024, 512),
        **cs,
    )
    table["bdd"] = _DomainInfo(
        "bdd", (), label_format=_CS_TRAINIDS, metric_convention="detectron2", evaluator_type="sem_seg", **cs
    )
    table["mv"] = _DomainInfo(
        "mapillary",
        (),
        class_json="datasets/mv65.json",
        num_classes=65,
        ignore_label=65,
        label_format="8-bit palette PNG whose indices are Mapillary Vistas v1.2 ids 0-64, 65 = unlabeled (ignore)",
        eval_label_kind="Mapillary Vistas v1.2 ids",
        metric_convention="detectron2",
        evaluator_type="sem_seg",
    )
    table["a150"] = _DomainInfo(
        "ade20k",
        (),
        class_json="datasets/ade150.json",
        num_classes=150,
        ignore_label=255,
        label_format="8-bit PNG of ADE20K-150 ids 0-149, 255 = ignore (official ids minus 1; see prepare_ade20k)",
        eval_label_kind="contiguous ids",
        metric_convention="detectron2",
        evaluator_type="sem_seg",
    )
    table["idd"] = _DomainInfo(
        "idd",
        (),
        class_json="datasets/idd30.json",
        num_classes=26,
        ignore_label=255,
        label_format="8-bit PNG of IDD level-3 ids 0-25, 255 = ignore (*_gtFine_labellevel3Ids.png)",
        eval_label_kind="IDD level-3 ids",
        metric_convention="detectron2",
        evaluator_type="sem_seg",
    )
    table["pc59"] = _DomainInfo(
        "pascal_ctx59",
        (),
        class_json="datasets/pc59.json",
        num_classes=59,
        ignore_label=255,
        label_format="8-bit PNG of PASCAL-Context-59 ids 0-58, 255 = ignore",
        eval_label_kind="contiguous ids",
        metric_convention="detectron2",
        evaluator_type="sem_seg",
    )
    table["nyu"] = _DomainInfo(
        "nyu",
        (),
        class_json="datasets/nyu40.json",
        num_classes=40,
        ignore_label=255,
        label_format="8-bit PNG of NYUv2-40 ids used as stored, 255 assumed ignore (unverified in the original)",
        eval_label_kind="contiguous ids",
        metric_convention="detectron2",
        evaluator_type="sem_seg",
    )
    table["coconutL"] = _DomainInfo(
        "coconut",
        (),
        class_json="datasets/coconut.json",
        num_classes=133,
        ignore_label=255,
        label_format="8-bit PNG of 133 contiguous COCO panoptic ids, 255 = ignore",
        eval_label_kind="contiguous ids",
        metric_convention="detectron2",
        evaluator_type="sem_seg",
    )
    return table


def dataset_name(domain: str, split: str) -> str:
    """Registered dataset name of a domain split: ``f"{domain}_sem_seg_{split}"``."""
    return f"{domain}_sem_seg_{split}"


def build_registry() -> dict[str, DatasetSpec]:
    """Build the name -> ``DatasetSpec`` mapping for every domain and split (pure; no I/O)."""
    registry: dict[str, DatasetSpec] = {}
    for domain, info in _domain_table().items():
        for split in SPLITS:
            name = dataset_name(domain, split)
            registry[name] = DatasetSpec(
                name=name,
                domain=domain,
                split=split,
                layout=info.layout,
                layout_kwargs=info.layout_kwargs,
                class_json=info.class_json,
                num_classes=info.num_classes,
                ignore_label=info.ignore_label,
                label_format=info.label_format,
                eval_label_kind=info.eval_label_kind,
                metric_convention=info.metric_convention,
                evaluator_type=info.evaluator_type,
                resize_to=info.resize_to,
            )
    return registry


DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(build_registry())
"""Read-only registry of all 40 datasets (20 domains x {train, val})."""

DOMAINS: tuple[str, ...] = tuple(dict.fromkeys(spec.domain for spec in DATASETS.values()))
"""The 20 SemLA domain names, in the paper's order."""


class UnknownDatasetError(KeyError):
    """Unknown dataset or domain name; the message lists close matches."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_SPEC_HINT = (
    " (a domain of your own is known once its spec is registered: DATASETS.SPECS [FILE], the spec file as "
    "the config, or --domain_spec FILE; see docs/own_domain.md)"
)


def _unknown(kind: str, name: str, known: list[str]) -> UnknownDatasetError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
    return UnknownDatasetError(f"unknown {kind} {name!r}{hint}{_SPEC_HINT}")


# ----------------------------------------------------------------------------------------------------
# domains of your own (cat_seg.data.domain_spec), registered per process

_REGISTERED: dict[str, DatasetSpec] = {}
_SPECS: dict[str, Any] = {}  # domain name -> DomainSpec


def register_domain_spec(spec: Any) -> list[str]:
    """Add the datasets of a :class:`~cat_seg.data.domain_spec.DomainSpec` to this process's registry.

    Registering the same spec again (same content) is a no-op.

    Returns:
        the dataset names it defines (``<name>_sem_seg_train`` and/or ``_val``).
    Raises:
        DomainSpecError: the name is a built-in domain's, or another spec already defined it differently.
    """
    from dataclasses import replace

    from .domain_spec import DomainSpecError

    if spec.name in DOMAINS:
        raise DomainSpecError(
            f"domain spec {spec.path}: name {spec.name!r} is a built-in domain; choose another"
        )
    known = _SPECS.get(spec.name)
    if known is not None and replace(spec, path=known.path) != known:
        raise DomainSpecError(
            f"domain {spec.name!r} is defined by two different specs: {known.path} and {spec.path}"
        )
    names = []
    for split, where in spec.splits:
        name = dataset_name(spec.name, split)
        _REGISTERED[name] = DatasetSpec(
            name=name,
            domain=spec.name,
            split=split,
            layout="spec",
            layout_kwargs=(
                ("image_suffixes", tuple(where.image_suffixes)),
                ("images", where.images),
                ("label_suffix", where.label_suffix),
                ("labels", where.labels),
            ),
            class_json=str(spec.class_json),
            num_classes=spec.num_classes,
            ignore_label=spec.ignore_label,
            label_format=f"8-bit PNG of class ids 0-{spec.num_classes - 1}, {spec.ignore_label} = ignore",
            eval_label_kind="contiguous ids",
            metric_convention=spec.metric,
            evaluator_type="sem_seg",
        )
        names.append(name)
    if known is None:
        _SPECS[spec.name] = spec
    return names


def register_domain_spec_file(path: str | os.PathLike) -> Any:
    """Load (``load_domain_spec``) and register a spec file; returns the ``DomainSpec``."""
    from .domain_spec import load_domain_spec

    spec = load_domain_spec(path)
    register_domain_spec(spec)
    return _SPECS[spec.name]


def unregister_domain_specs() -> None:
    """Forget every domain of your own registered in this process (for tests and long-lived processes)."""
    _REGISTERED.clear()
    _SPECS.clear()


def registered_domain_specs() -> list[Any]:
    """The domain specs registered in this process, in registration order."""
    return list(_SPECS.values())


def domain_spec(domain: str) -> Any | None:
    """The registered spec of a domain of your own, or None (built-in or unknown domains)."""
    return _SPECS.get(domain)


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a registered dataset; an unknown name raises ``UnknownDatasetError`` (a KeyError)."""
    found = DATASETS.get(name) or _REGISTERED.get(name)
    if found is not None:
        return found
    domain, _, split = name.rpartition("_sem_seg_")
    if domain in _SPECS:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}: the spec of domain {domain!r} ({_SPECS[domain].path}) has no {split!r} split"
        )
    raise _unknown("dataset", name, [*DATASETS, *_REGISTERED]) from None


def list_datasets(domain: str | None = None) -> list[str]:
    """All registered dataset names (built-in ones first), or those of one domain."""
    every = {**DATASETS, **_REGISTERED}
    if domain is None:
        return list(every)
    if domain not in DOMAINS and domain not in _SPECS:
        raise _unknown("domain", domain, list_domains())
    return [n for n, s in every.items() if s.domain == domain]


def list_domains() -> list[str]:
    """The 20 SemLA domain names, then the domains of your own registered in this process."""
    return [*DOMAINS, *_SPECS]


def load_records(name: str, root: str | Path) -> list[dict[str, Any]]:
    """Records of dataset ``name`` under the dataset root ``root`` (see ``layouts.records_from_scan``)."""
    return get_dataset(name).loader(Path(root))


def default_root(env: Mapping[str, str] | None = None) -> Path:
    """The dataset root from ``$DETECTRON2_DATASETS`` (call from a CLI ``main`` only).

    Args:
        env: environment mapping; ``os.environ`` when None.
    Raises:
        ValueError: the variable is unset or empty.
    """
    env = os.environ if env is None else env
    value = env.get("DETECTRON2_DATASETS", "")
    if not value:
        raise ValueError(
            "DETECTRON2_DATASETS is not set: pass the dataset root explicitly (e.g. --root DIR) or "
            "export DETECTRON2_DATASETS=/path/to/datasets"
        )
    return Path(value).expanduser()
