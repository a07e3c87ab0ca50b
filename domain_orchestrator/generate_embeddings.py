"""Compute each source domain's prototype: the mean image embedding of its training images.

Writes ``<lora_library_path>/<domain>/<domain>_statistics.npz`` (``train_average_embedding``, (1, D)
float32, as the original code) atomically, with the embedder's identity, the dataset and the image count
recorded in the file (``semla_metadata``) so that ``experiments.py`` can refuse prototypes made by
another embedder. Existing files are kept unless ``--overwrite``.

Examples::

    python domain_orchestrator/generate_embeddings.py --source_domains configs/source_domains.yaml \\
        --lora_library_path catseg/loradb --embedding_model /models/clip-vit-large-patch14
    python domain_orchestrator/generate_embeddings.py ... --embedding_model catseg \\
        --model_weights catseg/models/model_final.pth         # CAT-Seg's own CLIP image tower
    python domain_orchestrator/generate_embeddings.py --images /data/floods/train --name floods \
        --lora_library_path catseg/loradb --embedding_model /models/clip-vit-large-patch14   # any folder

The images are those of each domain's registered training dataset (``<domain>_sem_seg_train`` under
``--datasets_root`` / ``$DETECTRON2_DATASETS``; for a domain of your own, the folders of its spec), each
embedded from its original file; or, with ``--images DIR --name NAME``, those of any folder. Exit status: 0 on
success, 1 with a one-line message when something is missing or wrong (all problems are checked before
any embedding), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a file: its folder (this package) must not shadow top-level modules of the same names.
    sys.path.pop(0)

logger = logging.getLogger("generate_embeddings")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate_embeddings.py",
        description="Write each source domain's mean image embedding (<lib>/<domain>/<domain>_statistics.npz), "
        "for the domains of a list or for a folder of images (--images DIR --name NAME).",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--source_domains",
        "--source_domains_file",
        dest="source_domains",
        type=Path,
        help="YAML list of domains: names, or domain spec files (--source_domains_file, the original's name, "
        "works too)",
    )
    what.add_argument(
        "--images",
        nargs="+",
        metavar="DIR",
        help="image folders, files or glob patterns whose mean embedding is the statistics of --name (no dataset "
        "or domain needed)",
    )
    parser.add_argument("--name", help="with --images: the domain (adapter folder) the statistics belong to")
    parser.add_argument(
        "--domain_specs",
        type=Path,
        metavar="DIR",
        help="register every domain spec (*.yaml) of DIR, so that the list may name those domains",
    )
    parser.add_argument(
        "--lora_library_path",
        required=True,
        help="adapter library folder; a relative path is looked up in the current folder, then in catseg/",
    )
    parser.add_argument(
        "--embedding_model",
        required=True,
        help="a local Hugging Face CLIPModel folder (the original: openai/clip-vit-large-patch14), "
        "open_clip:<model>:<checkpoint>, a local open_clip folder, or catseg (CAT-Seg's image tower)",
    )
    parser.add_argument("--datasets_root", type=Path, help="dataset root (default: $DETECTRON2_DATASETS)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--num_workers", type=int, default=4, help="image-decoding workers (default: 4)")
    parser.add_argument(
        "--model_weights",
        default="models/model_final.pth",
        help="CAT-Seg checkpoint for --embedding_model catseg (default: models/model_final.pth)",
    )
    parser.add_argument(
        "--config_overlay",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="YAML merged over the domain config that builds the catseg model (repeatable)",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check, embed; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from cat_seg.cli import report_errors
    from cat_seg.engine.setup import logging_to

    with logging_to(None):
        return report_errors("generate_embeddings.py", lambda: _main(args, argv), debug=args.debug)


def _image_list_digest(files: Sequence[str], root: Path | None) -> str:
    """sha256 of the sorted image paths relative to ``root`` (which images the mean is over)."""
    digest = hashlib.sha256()
    names = sorted(os.path.relpath(f, root) if root is not None else os.path.basename(f) for f in files)
    for name in names:
        digest.update(name.encode("utf-8") + b"\n")
    return digest.hexdigest()


def find_images(patterns: Sequence[str]) -> list[str]:
    """Folders (their images, recursively, sorted), files and glob patterns -> image files.

    Raises:
        FileNotFoundError: an entry that matches no image, named.
    """
    import glob

    found: list[str] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            images = sorted(
                str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if not images:
                raise FileNotFoundError(
                    f"--images {pattern}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder"
                )
            found += images
        elif path.is_file():
            found.append(str(path))
        else:
            matches = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"--images {pattern}: no such folder or file, and no file matches it")
            found += matches
    return [str(Path(f).absolute()) for f in dict.fromkeys(found)]


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    import numpy as np

    from cat_seg.config import find_input_path
    from cat_seg.data import DatasetError, load_records
    from cat_seg.data.domain_spec import DEFAULT_BASE_CONFIG
    from cat_seg.data.registry import domain_spec
    from cat_seg.engine.lora import validate_adapter_name
    from cat_seg.engine.setup import git_sha, resolve_device
    from domain_orchestrator.domains import get_domain, read_domain_list, register_spec_folder
    from domain_orchestrator.prototypes import (
        StatisticsError,
        read_statistics_metadata,
        same_embedder,
        statistics_path,
        write_statistics,
    )
    from domain_orchestrator.settings import ExperimentError, embedding_model_problem

    problems: list[str] = []
    if args.domain_specs is not None:
        register_spec_folder(args.domain_specs)
    if args.images is not None:
        if not args.name:
            raise ValueError(
                "--images needs --name NAME: the domain (adapter folder) the statistics belong to"
            )
        try:
            validate_adapter_name(args.name)
        except ValueError:
            raise ValueError(
                f"--name must be letters, digits, '_' or '-' (it names a folder), got {args.name!r}"
            ) from None
        domains = [args.name]
    else:
        if args.name:
            raise ValueError("--name goes with --images (a list of domains names its domains itself)")
        domains = read_domain_list(args.source_domains, what="source domains")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    library = find_input_path(args.lora_library_path)
    todo = [d for d in domains if args.overwrite or not statistics_path(library / d, d).is_file()]
    kept = [d for d in domains if d not in todo]
    # built-in domains read their images under the dataset root; a domain spec says where its are
    needs_root = args.images is None and any(domain_spec(d) is None for d in todo)
    root = args.datasets_root or (
        Path(os.environ["DETECTRON2_DATASETS"]) if os.environ.get("DETECTRON2_DATASETS") else None
    )
    if root is not None:
        root = root.expanduser().absolute()
    if needs_root and root is None:
        raise ValueError("no dataset root: pass --datasets_root DIR or set $DETECTRON2_DATASETS")
    if needs_root and not root.is_dir():
        raise FileNotFoundError(
            f"dataset root {root} does not exist (--datasets_root or $DETECTRON2_DATASETS)"
        )
    files: dict[str, list[str]] = {}
    sources: dict[str, dict[str, str | None]] = {}  # domain -> where its images come from (metadata)
    for name in todo:
        if args.images is not None:
            files[name] = find_images(args.images)
            sources[name] = {"dataset": None, "images": " ".join(args.images)}
            continue
        dataset = get_domain(name).train_dataset
        where = root if domain_spec(name) is None else "its spec's folders"
        try:
            records = load_records(dataset, root or Path.cwd())
            files[name] = [r["file_name"] for r in records]
            sources[name] = {"dataset": dataset}
            if not records:
                problems.append(f"{name}: {dataset} has no images under {where}")
        except (DatasetError, FileNotFoundError, KeyError) as e:
            problems.append(f"{name}: {dataset} is not usable under {where}: {e}")
    device = resolve_device(args.device)
    model = None
    if args.embedding_model == "catseg":
        weights = find_input_path(args.model_weights)
        if not weights.is_file():
            problems.append(
                f"--model_weights {args.model_weights}: CAT-Seg checkpoint not found (looked at {weights})"
            )
    elif (problem := embedding_model_problem(args.embedding_model)) is not None:
        problems.append(problem)
    missing_identity = []  # kept files that record no embedder, beside files written with one
    for name in kept:
        try:
            metadata = read_statistics_metadata(library / name, name)
        except StatisticsError as e:
            problems.append(f"{e} (pass --overwrite to recompute it)")
            continue
        if (metadata or {}).get("embedder") is None:
            missing_identity.append(name)
    if missing_identity and todo:
        problems.append(
            f"the statistics of {', '.join(missing_identity)} (in {library}) record no embedder, but those written "
            f"now ({', '.join(todo)}) will: a library mixing both cannot be checked against --embedding_model; "
            "pass --overwrite to recompute every file with this embedder"
        )
    if problems:
        raise ExperimentError(problems)

    from domain_orchestrator.embedding import load_embedder

    if args.embedding_model == "catseg":
        from cat_seg.checkpoint import load_checkpoint
        from cat_seg.config import load_config
        from cat_seg.modeling import build_model
        from domain_orchestrator.plan import target_config

        if args.images is not None:
            cfg = load_config(
                DEFAULT_BASE_CONFIG, ["MODEL.WEIGHTS", str(weights)], overlays=args.config_overlay
            )
        else:
            cfg = target_config(domains[0], model_weights=weights, overlays=args.config_overlay)
        model = build_model(cfg, device, class_names=False)
        load_checkpoint(model, weights)
        model.eval()
    embedder = load_embedder(args.embedding_model, device=device, catseg_model=model)
    logger.info("embedder: %s (%d-d) on %s", args.embedding_model, embedder.dim, device)

    for name in kept:
        made_by = (read_statistics_metadata(library / name, name) or {}).get("embedder")
        if made_by is None:
            logger.warning("%s: kept %s (no embedder recorded)", name, statistics_path(library / name, name))
        elif not same_embedder(made_by, embedder.identity):
            logger.warning(
                "%s: kept %s, made by another embedder (%s %s); pass --overwrite to recompute it",
                name,
                statistics_path(library / name, name),
                made_by.get("kind"),
                made_by.get("name"),
            )
    rows = [(name, "kept", "-") for name in kept]
    for name in todo:
        vectors = embedder.embed_files(
            files[name],
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            desc=name,
        )
        mean = vectors.astype(np.float64).mean(axis=0)
        image_root = root if sources[name].get("dataset") and domain_spec(name) is None else None
        metadata = {
            "format": 1,
            "domain": name,
            **sources[name],
            "num_images": len(files[name]),
            "images_sha256": _image_list_digest(files[name], image_root),
            "embedder": embedder.identity,
            "embedding_model": args.embedding_model,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_sha": git_sha(),
        }
        path = write_statistics(library / name, name, mean, metadata)
        logger.info("%s: mean of %d embeddings -> %s", name, len(files[name]), path)
        rows.append((name, "written", str(len(files[name]))))
    width = max(len(n) for n in domains) + 2
    print(f"{'domain':<{width}}{'status':<10}{'images':>8}")
    for name in domains:
        row = next(r for r in rows if r[0] == name)
        print(f"{name:<{width}}{row[1]:<10}{row[2]:>8}")
    print(f"statistics in {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
