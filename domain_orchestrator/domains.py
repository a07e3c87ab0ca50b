"""SemLA's domains: name -> (config file, training dataset, validation dataset), built-in or your own.

The 20 domains and their datasets are those of :mod:`cat_seg.data.registry` (``<domain>_sem_seg_train``
/ ``_val``); this module adds the one fact the registry does not hold, the config file each domain's
adapter is trained and evaluated with (the original code's ``get_domain_args`` table), and reads the
YAML lists of source and target domains that ``experiments.py`` and ``generate_embeddings.py`` take.

Domains of your own come from domain specs (:mod:`cat_seg.data.domain_spec`): registered from a folder
(:func:`register_spec_folder`, ``--domain_specs DIR``) or named by their file in a domain list; their
config file is the spec itself (``load_config`` turns it into the domain's config).

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

from cat_seg.data.domain_spec import DomainSpecError, find_spec_files
from cat_seg.data.registry import (
    CATSEG_DIR,
    DOMAINS,
    DatasetSpec,
    dataset_name,
    domain_spec,
    get_dataset,
    register_domain_spec_file,
)
from cat_seg.data.registry import list_domains as registered_domains
from cat_seg.fileio import read_yaml

__all__ = [
    "Domain",
    "DomainError",
    "UnknownDomainError",
    "get_domain",
    "list_domains",
    "read_domain_list",
    "register_spec_folder",
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
    """A domain name that is neither built-in nor registered from a spec; the message lists the known ones."""


@dataclass(frozen=True)
class Domain:
    """One SemLA domain.

    Attributes:
        name: ``acdc-rain``, ``muses-fog-night``, ``mv``, ... or the name in a domain spec.
        config_file: the domain's config (absolute path inside ``catseg/configs``), or its spec file.
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
    """The 20 SemLA domain names (the paper's source order), then the ones registered from specs."""
    return registered_domains()


def _known() -> str:
    return ", ".join(list_domains())


def get_domain(name: str) -> Domain:
    """The domain called ``name`` (built-in, or registered from a domain spec).

    Raises:
        UnknownDomainError: listing the known names (and the closest ones).
    """
    spec = domain_spec(name) if isinstance(name, str) else None
    if spec is not None:
        return Domain(
            name=name,
            config_file=spec.path,
            train_dataset=dataset_name(name, "train"),
            val_dataset=dataset_name(name, "val"),
        )
    if name not in DOMAINS:
        close = difflib.get_close_matches(str(name), list_domains(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownDomainError(
            f"unknown domain {name!r}; {hint}known domains: {_known()} (a domain of your own: name its spec "
            "file in the list, or pass --domain_specs DIR)"
        )
    return Domain(
        name=name,
        config_file=CATSEG_DIR / _config_file(name),
        train_dataset=dataset_name(name, "train"),
        val_dataset=dataset_name(name, "val"),
    )


def register_spec_folder(folder: str | os.PathLike) -> list[str]:
    """Register every domain spec (``*.yaml``) of a folder; returns their domain names.

    Raises:
        FileNotFoundError: no such folder, or no ``*.yaml`` in it.
        DomainSpecError: naming each spec file that cannot be used (all of them at once).
    """
    names, problems = [], []
    for path in find_spec_files(folder):
        try:
            names.append(register_domain_spec_file(path).name)
        except DomainSpecError as e:
            problems.append(str(e))
    if problems:
        raise DomainSpecError("; ".join(problems))
    return names


def _is_spec_entry(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))


def read_domain_list(path: str | os.PathLike, *, what: str = "domains") -> list[str]:
    """Read a YAML list of domains (the original's ``config/source_domains.yaml`` format).

    An entry is a domain name, or the path of a domain spec file (``*.yaml``; relative to the list's
    folder, else to the current one), which is registered and stands for its domain.

    Args:
        path: the YAML file.
        what: what the list is, for messages (``source domains``, ``target domains``).
    Returns:
        the names, in file order (checked: known, not repeated, at least one).
    Raises:
        FileNotFoundError: the file does not exist.
        DomainError: not a YAML list of strings, empty, repeated or unknown names, unusable spec files
            (all reported).
    """
    path = Path(path)
    entries = read_yaml(path, what=f"{what} file", error=DomainError)
    if not isinstance(entries, list) or not all(isinstance(n, str) for n in entries):
        raise DomainError(f"{path}: expected a YAML list of {what} names (- acdc-rain, - bdd, ...)")
    if not entries:
        raise DomainError(f"{path}: the list of {what} is empty")
    names, problems = [], []
    for entry in entries:
        if not _is_spec_entry(entry):
            names.append(entry)
            continue
        spec_file = Path(entry).expanduser()
        if not spec_file.is_absolute():
            beside = path.parent / spec_file
            spec_file = beside if beside.is_file() or not spec_file.is_file() else spec_file
        try:
            names.append(register_domain_spec_file(spec_file).name)
        except (DomainSpecError, FileNotFoundError) as e:
            problems.append(str(e))
    if problems:
        raise DomainError(f"{path}: " + "; ".join(problems))
    return check_domain_names(names, where=str(path))


def check_domain_names(names: Sequence[str], *, where: str) -> list[str]:
    """Check that every name is a known domain and none repeats; all problems in one error."""
    known = _known()
    problems = []
    for name in names:
        try:
            get_domain(name)
        except UnknownDomainError as e:
            problems.append(str(e).split("; known domains:")[0].split(" known domains:")[0].rstrip(" ;"))
    unknown = bool(problems)
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        problems.append(f"repeated: {', '.join(repeated)}")
    if problems:
        error = UnknownDomainError if unknown else DomainError
        own = (
            "; a domain of your own: name its spec file in the list, or pass --domain_specs DIR"
            if unknown
            else ""
        )
        raise error(f"{where}: " + "; ".join(problems) + f" (known domains: {known}{own})")
    return list(names)
