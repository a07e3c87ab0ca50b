"""Domain prototypes: the ``<domain>_statistics.npz`` files of an adapter library.

A domain's prototype is the mean CLIP image embedding of its training images, stored as the original
SemLA code stores it::

    <library>/<domain>/<domain>_statistics.npz
        train_average_embedding   (1, D) float32       (the only key the original code reads)
        semla_metadata            0-d unicode string   (JSON; this project's addition, see below)

``semla_metadata`` records which embedder made the prototype (its identity: kind, name, dimension and
a digest of its weights), from which dataset and how many images, so that an experiment can refuse
prototypes made by another embedder than the one it embeds test images with. The file stays readable
by the original code (``np.load(path)["train_average_embedding"]``). Files without metadata (the
released ones, or those the original code wrote) are accepted, with their origin unknown.

Writes are atomic (temporary file, then rename): an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cat_seg.fileio import atomic_write

__all__ = [
    "METADATA_KEY",
    "Prototypes",
    "load_prototypes",
    "same_embedder",
    "STATISTICS_KEY",
    "StatisticsError",
    "read_statistics",
    "read_statistics_metadata",
    "statistics_path",
    "write_statistics",
]

STATISTICS_KEY = "train_average_embedding"
METADATA_KEY = "semla_metadata"


class StatisticsError(ValueError):
    """A statistics file that cannot be used; the message names the file and the problem."""


def statistics_path(folder: str | os.PathLike, name: str) -> Path:
    """``<folder>/<name>_statistics.npz``, the original code's file name for a domain's prototype."""
    return Path(folder) / f"{name}_statistics.npz"


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise StatisticsError(f"missing statistics {path} (the domain's mean CLIP image embedding)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise StatisticsError(f"{path} is not a readable .npz file ({e})") from None


def read_statistics(folder: str | os.PathLike, name: str) -> np.ndarray:
    """The domain prototype ``train_average_embedding`` as a (D,) float32 array.

    Raises:
        StatisticsError: missing file, missing key, wrong shape or non-finite values (naming the file).
    """
    path = statistics_path(folder, name)
    arrays = _load_arrays(path)
    if STATISTICS_KEY not in arrays:
        raise StatisticsError(f"{path} has no {STATISTICS_KEY!r} array")
    embedding = arrays[STATISTICS_KEY]
    if embedding.ndim == 2 and embedding.shape[0] == 1:
        embedding = embedding[0]
    if embedding.ndim != 1 or embedding.size == 0:
        raise StatisticsError(f"{path}: {STATISTICS_KEY} must have shape (1, D), got {embedding.shape}")
    if not np.issubdtype(embedding.dtype, np.floating):
        raise StatisticsError(f"{path}: {STATISTICS_KEY} must hold floats, got {embedding.dtype}")
    if not np.isfinite(embedding).all():
        raise StatisticsError(f"{path}: {STATISTICS_KEY} holds NaN or Inf")
    return embedding.astype(np.float32)


def read_statistics_metadata(folder: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The ``semla_metadata`` of a statistics file, or None when the file has none (original files).

    Raises:
        StatisticsError: the file is missing or unreadable, or its metadata is not a JSON object.
    """
    path = statistics_path(folder, name)
    arrays = _load_arrays(path)
    if METADATA_KEY not in arrays:
        return None
    try:
        metadata = json.loads(str(arrays[METADATA_KEY]))
    except json.JSONDecodeError as e:
        raise StatisticsError(f"{path}: {METADATA_KEY} is not valid JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise StatisticsError(f"{path}: {METADATA_KEY} must be a JSON object")
    return metadata


def write_statistics(
    folder: str | os.PathLike, name: str, mean: np.ndarray, metadata: dict[str, Any] | None = None
) -> Path:
    """Write a domain prototype atomically.

    Args:
        folder: the domain's library folder (created if missing).
        name: the domain name (the file is ``<name>_statistics.npz``).
        mean: (D,) or (1, D) mean embedding; stored as (1, D) float32.
        metadata: JSON-serialisable description (embedder identity, dataset, image count, ...).
    Returns:
        the file written.
    """
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1)
    if not np.isfinite(mean).all():
        raise StatisticsError(f"refusing to write statistics of {name!r}: the mean holds NaN or Inf")
    arrays: dict[str, np.ndarray] = {STATISTICS_KEY: mean}
    if metadata is not None:
        arrays[METADATA_KEY] = np.array(json.dumps(metadata, sort_keys=True))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # to memory first: np.savez would append ".npz" to a temporary name
    return atomic_write(statistics_path(folder, name), lambda f: f.write(buffer.getvalue()))


def same_embedder(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two embedder identities give the same vectors (kind, dimension and weights digest)."""
    return all(a.get(k) == b.get(k) for k in ("kind", "dim", "digest"))


def describe_embedder(identity: Mapping[str, Any]) -> str:
    """``hf_clip vit-p14-224-w1024-l24, 768-d, digest 0123456789ab``."""
    digest = str(identity.get("digest"))[:12]
    return f"{identity.get('kind')} {identity.get('name')}, {identity.get('dim')}-d, digest {digest}"


@dataclass
class Prototypes:
    """The prototypes of some domains of a library, checked against the embedder that will be used.

    Attributes:
        vectors: (N, D) float32, in the order of ``names`` (None when any problem was found).
        names: the domains.
        problems: what makes them unusable (missing or malformed files, another dimension or embedder).
        unverified: domains whose file records no embedder (the original's files): assumed to match when no
            file records one; mixed with files that do, a problem.
    """

    vectors: np.ndarray | None
    names: list[str]
    problems: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)


def load_prototypes(
    library: str | os.PathLike,
    names: Sequence[str],
    identity: Mapping[str, Any] | None = None,
    *,
    spec: str = "",
) -> Prototypes:
    """Read the prototypes of ``names`` from ``<library>/<name>/<name>_statistics.npz`` and check them.

    Args:
        library: the adapter library folder.
        names: the domains, in the order wanted.
        identity: the identity of the embedder that will embed the test images (``ImageEmbedder.identity``);
            prototypes of another dimension or made by another embedder are problems. None: not checked.
        spec: how the user named that embedder (``--embedding_model``), for the messages.
    Returns:
        the prototypes and every problem found (reported together, grouped by cause).
    """
    library = Path(library)
    vectors, problems, unverified = [], [], []
    foreign: dict[str, list[str]] = {}  # embedder description -> domains whose statistics it made
    for name in names:
        folder = library / name
        if not statistics_path(folder, name).is_file():
            problems.append(
                f"source {name!r}: missing statistics {statistics_path(folder, name)} (the domain's mean image "
                f"embedding); make them with generate_embeddings.py --images <its training images> --name {name} "
                f"--lora_library_path {library} --embedding_model {spec or 'SPEC'}"
            )
            continue
        try:
            vector = read_statistics(folder, name)
            metadata = read_statistics_metadata(folder, name)
        except StatisticsError as e:
            problems.append(f"source {name!r}: {e}")
            continue
        vectors.append(vector)
        if identity is None:
            continue
        if vector.shape[0] != identity.get("dim"):
            problems.append(
                f"source {name!r}: {statistics_path(folder, name)} holds a {vector.shape[0]}-d prototype but "
                f"the embedder {spec} gives {identity.get('dim')}-d embeddings; recompute the statistics "
                "with this embedder (generate_embeddings.py --overwrite)"
            )
        elif metadata is None or "embedder" not in metadata:
            unverified.append(name)
        elif not same_embedder(metadata["embedder"], identity):
            foreign.setdefault(describe_embedder(metadata["embedder"]), []).append(name)
    for made_by, which in foreign.items():
        problems.append(
            f"the statistics of {', '.join(which)} (in {library}) were made by another embedder ({made_by}) than "
            f"{spec or 'the embedder given'} ({describe_embedder(identity or {})}); recompute them with this "
            "embedder (generate_embeddings.py --overwrite) or pass the embedder that made them"
        )
    if unverified and len(unverified) < len(vectors):
        problems.append(
            f"the statistics of {', '.join(unverified)} (in {library}) record no embedder while the others do: a "
            "library mixing both cannot be checked against the embedder; recompute them with "
            "generate_embeddings.py --overwrite (the domain's list, or --images DIR --name NAME)"
        )
    if len({v.shape[0] for v in vectors}) > 1 and not problems:
        problems.append(f"the statistics in {library} have different dimensions")
    stacked = np.stack(vectors) if vectors and not problems else None
    return Prototypes(stacked, list(names), problems, unverified)
