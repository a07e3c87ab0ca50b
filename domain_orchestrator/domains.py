"""SemLA's domains: name -> (config file, training dataset, validation dataset).

The 20 domains and their datasets are those of :mod:`cat_seg.data.registry` (``<domain>_sem_seg_train``
/ ``_val``); this module adds the one fact the registry does not hold, the config file each domain's
adapter is trained and evaluated with (the original code's ``get_domain_args`` table), and reads the
YAML lists of source and target domains that ``experiments.py`` and ``generate_embeddings.py`` take.

Deliberate differences from the original table: a domain's prototype is computed from the images of
its *registered* training dataset (the original globbed other folders for ``a150``, ``nyu`` and
``coconutL``), and the unusable ``cs-rain-*`` domains (no registered dataset) are not offered.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from cat_seg.data.registry import CATSEG_DIR, DOMAINS, DatasetSpec, dataset_name, get_dataset

__all__ = [
    "Domain",
    "DomainError",
    "UnknownDomainError",
    "get_domain",
    "list_domains",
    "read_domain_list",
]

# Config files of the domains whose name does not give it (relative to catseg/, as in the original).
_CONFIG_FILES = {
    "cs-normal": "configs/cityscapes/normal/lora-normal.yaml",
    "bdd": "configs/bdd/bdd.yaml",
    "mv": "configs/mv/mv.yaml",
    "a150": "configs/a150/a150.yaml",
    "idd": "configs/idd/idd.yaml",
    "pc59": "configs/pc59/pc59.yaml",
    "nyu": "configs/nyu/nyu.yaml",
    "coconutL": "configs/coconutL/coconutL.yaml",
}


class DomainError(ValueError):
    """A domain list that cannot be used; the message names the file and the problem."""


class UnknownDomainError(DomainError):
    """A domain name that is not one of the 20 SemLA domains; the message lists the known ones."""


@dataclass(frozen=True)
class Domain:
    """One SemLA domain.

    Attributes:
        name: ``acdc-rain``, ``muses-fog-night``, ``mv``, ...
        config_file: the domain's config (absolute path inside ``catseg/configs``).
        train_dataset: registered name of its training split (the prototype's images).
        val_dataset: registered name of its validation split (what experiments evaluate).
    """

    name: str
    config_file: Path
    train_dataset: str
    val_dataset: str

    @property
    def train_spec(self) -> DatasetSpec:
        return get_dataset(self.train_dataset)

    @property
    def val_spec(self) -> DatasetSpec:
        return get_dataset(self.val_dataset)


def _config_file(name: str) -> str:
    family, _, condition = name.partition("-")
    if family == "acdc":  # configs/acdc/rain/lora-rain-acdc.yaml
        return f"configs/acdc/{condition}/lora-{condition}-acdc.yaml"
    if family == "muses":  # configs/muses/fog/muses-fog-night.yaml
        return f"configs/muses/{condition.split('-')[0]}/muses-{condition}.yaml"
    return _CONFIG_FILES[name]


def list_domains() -> list[str]:
    """The 20 SemLA domain names, in the order of the paper's source list."""
    return list(DOMAINS)


def get_domain(name: str) -> Domain:
    """The domain called ``name``.

    Raises:
        UnknownDomainError: listing the known names (and the closest ones).
    """
    if name not in DOMAINS:
        close = difflib.get_close_matches(str(name), DOMAINS, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownDomainError(f"unknown domain {name!r}; {hint}known domains: {', '.join(DOMAINS)}")
    return Domain(
        name=name,
        config_file=CATSEG_DIR / _config_file(name),
        train_dataset=dataset_name(name, "train"),
        val_dataset=dataset_name(name, "val"),
    )


def read_domain_list(path: str | os.PathLike, *, what: str = "domains") -> list[str]:
    """Read a YAML list of domain names (the original's ``config/source_domains.yaml`` format).

    Args:
        path: the YAML file.
        what: what the list is, for messages (``source domains``, ``target domains``).
    Returns:
        the names, in file order (checked: known, not repeated, at least one).
    Raises:
        FileNotFoundError: the file does not exist.
        DomainError: not a YAML list of strings, empty, repeated or unknown names (all reported).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        names = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DomainError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DomainError(f"{path}: expected a YAML list of {what} names (- acdc-rain, - bdd, ...)")
    if not names:
        raise DomainError(f"{path}: the list of {what} is empty")
    return check_domain_names(names, where=str(path))


def check_domain_names(names: Sequence[str], *, where: str) -> list[str]:
    """Check that every name is a known domain and none repeats; all problems in one error."""
    problems = []
    for name in names:
        try:
            get_domain(name)
        except UnknownDomainError as e:
            problems.append(str(e).split("; known domains:")[0])
    unknown = bool(problems)
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        problems.append(f"repeated: {', '.join(repeated)}")
    if problems:
        error = UnknownDomainError if unknown else DomainError
        raise error(f"{where}: " + "; ".join(problems) + f" (known domains: {', '.join(DOMAINS)})")
    return list(names)
