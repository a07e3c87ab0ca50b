"""Datasets of the 20 SemLA domains: registry, loaders of the real layouts, mappers, loaders, and
synthetic writers of the same layouts. Importing this package registers nothing and reads nothing.

Typical use::

    from cat_seg.data import get_dataset, load_records, mapper_from_cfg, build_test_loader
    records = load_records("acdc-rain_sem_seg_val", root)          # root = $DETECTRON2_DATASETS
    loader = build_test_loader(records, mapper_from_cfg(cfg, is_train=False))
"""

from .build import (
    AugmentedDataset,
    InferenceSampler,
    MappedDataset,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
    trivial_batch_collator,
)
from .cityscapes_labels import label_ids_to_train_ids, train_ids_to_label_ids
from .io import (
    DatasetError,
    MissingDataError,
    check_label_values,
    image_size,
    read_image,
    read_label,
)
from .layouts import Scan, records_from_scan
from .mappers import SemSegTestMapper, SemSegTrainMapper, mapper_from_cfg
from .registry import (
    DATASETS,
    DOMAINS,
    DatasetSpec,
    UnknownDatasetError,
    build_registry,
    dataset_name,
    default_root,
    get_dataset,
    list_datasets,
    list_domains,
    load_records,
)

# The CLI modules (synthetic, validate, prepare) are imported lazily so that ``python -m`` runs them
# without a double-import warning.
_LAZY = {"write_synthetic": ".synthetic", "prepare_ade20k": ".prepare"}


def __getattr__(name: str) -> object:  # PEP 562 lazy attribute
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "DOMAINS",
    "AugmentedDataset",
    "DatasetError",
    "DatasetSpec",
    "InferenceSampler",
    "MappedDataset",
    "MissingDataError",
    "Scan",
    "SemSegTestMapper",
    "SemSegTrainMapper",
    "TrainingSampler",
    "UnknownDatasetError",
    "build_registry",
    "build_test_loader",
    "build_train_loader",
    "check_label_values",
    "dataset_name",
    "default_root",
    "get_dataset",
    "image_size",
    "label_ids_to_train_ids",
    "list_datasets",
    "list_domains",
    "load_records",
    "mapper_from_cfg",
    "prepare_ade20k",
    "read_image",
    "read_label",
    "records_from_scan",
    "train_ids_to_label_ids",
    "trivial_batch_collator",
    "write_synthetic",
]
