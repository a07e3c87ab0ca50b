"""Check what is present under a dataset root, per SemLA domain and split.

    python -m cat_seg.data.validate --root $DETECTRON2_DATASETS [--domains acdc-rain mv ...] [--splits val]
    python -m cat_seg.data.validate --domain_spec floods.yaml          # a domain of your own

For every requested domain/split it prints the expected folders (found / MISSING), the number of images
and labels, and every mismatch: image without label, label without image, files named by an index
(NYU split file, COCO panoptic JSON) that are missing, unexpected files, and image/label size
mismatches (headers only); for a domain of your own also label ids outside its class list. Exit status: 0 when every requested split is usable, 1 otherwise, 2 on a
usage error (unknown domain, no root).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .domain_spec import DomainSpecError
from .io import DatasetError, check_label_values, image_size, label_size, read_label
from .layouts import SPLITS, Pair, Scan
from .registry import (
    DOMAINS,
    UnknownDatasetError,
    dataset_name,
    default_root,
    domain_spec,
    get_dataset,
    list_datasets,
    register_domain_spec_file,
)

logger = logging.getLogger(__name__)

_MAX_LISTED = 5


@dataclass
class SplitReport:
    """Validation result of one dataset (domain x split)."""

    domain: str
    split: str
    dataset: str
    scan: Scan | None = None
    size_mismatches: list[str] = field(default_factory=list)
    sizes_checked: int = 0
    error: str | None = None

    def problems(self) -> list[str]:
        """Everything that makes the dataset unusable (empty when usable)."""
        if self.error is not None:
            return [self.error]
        assert self.scan is not None
        out = self.scan.problems()
        if self.size_mismatches:
            shown = "; ".join(self.size_mismatches[:_MAX_LISTED])
            more = (
                f" (and {len(self.size_mismatches) - _MAX_LISTED} more)"
                if len(self.size_mismatches) > _MAX_LISTED
                else ""
            )
            out.append(f"{len(self.size_mismatches)} image/label mismatch(es): {shown}{more}")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()


def _size_mismatch(pair: Pair, label_values: tuple[int, int] | None = None) -> str | None:
    """A size mismatch of the pair (headers only); with ``(num_classes, ignore)`` also out-of-range ids."""
    try:
        image_hw, label_hw = image_size(pair.image), label_size(pair.label)
        if label_values is not None:
            check_label_values(read_label(pair.label), *label_values, path=pair.label)
    except DatasetError as e:
        return str(e)
    if image_hw != label_hw:
        return f"{pair.image} is {image_hw[0]}x{image_hw[1]} but {pair.label} is {label_hw[0]}x{label_hw[1]}"
    return None


def check_dataset(
    name: str, root: str | Path, *, max_size_checks: int = -1, num_threads: int = 8
) -> SplitReport:
    """Scan one registered dataset under ``root`` and compare image/label sizes from their headers.

    Args:
        name: registered dataset name.
        root: dataset root.
        max_size_checks: compare sizes for at most this many pairs (-1: all; 0: none).
        num_threads: threads reading headers.
    """
    spec = get_dataset(name)
    report = SplitReport(spec.domain, spec.split, name)
    try:
        report.scan = spec.scanner(Path(root))
    except DatasetError as e:  # e.g. a malformed split file or panoptic JSON
        report.error = str(e)
        return report
    pairs = report.scan.pairs if max_size_checks < 0 else report.scan.pairs[:max_size_checks]
    # a domain of your own: its labels' ids are checked against its class list too
    values = (spec.num_classes, spec.ignore_label) if domain_spec(spec.domain) is not None else None
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = list(pool.map(lambda pair: _size_mismatch(pair, values), pairs))
    report.sizes_checked = len(pairs)
    report.size_mismatches = [r for r in results if r is not None]
    label_ids = [
        p.extra["label_ids_file_name"] for p in report.scan.pairs if "label_ids_file_name" in p.extra
    ]
    if label_ids:  # Cityscapes family: *_labelIds.png are optional (cityscapesScripts-style evaluation)
        present = sum(Path(f).is_file() for f in label_ids)
        report.scan.notes.append(f"{present} of {len(label_ids)} *_labelIds.png files present (optional)")
    return report


def validate_root(
    root: str | Path,
    domains: Sequence[str] | None = None,
    splits: Sequence[str] = SPLITS,
    *,
    max_size_checks: int = -1,
) -> list[SplitReport]:
    """``check_dataset`` for every requested domain and split (default: all 20 domains, both splits).

    A domain of your own (registered from its spec) is checked for the splits its spec defines.
    """
    reports = []
    for domain in domains or DOMAINS:
        present = list_datasets(domain)  # raises UnknownDatasetError with close matches
        for split in splits:
            name = dataset_name(domain, split)
            if domain_spec(domain) is not None and name not in present:
                continue
            reports.append(check_dataset(name, root, max_size_checks=max_size_checks))
    return reports


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def format_reports(reports: Sequence[SplitReport], root: Path) -> str:
    """Human-readable tables, one per domain."""
    lines: list[str] = []
    header = f"  {'split':<6}{'status':<9}{'images':>8}{'labels':>8}{'pairs':>8}{'no-label':>10}{'no-image':>10}{'size-diff':>11}"
    for domain in dict.fromkeys(r.domain for r in reports):
        lines.append(f"== {domain} ==")
        lines.append(header)
        rows = [r for r in reports if r.domain == domain]
        for r in rows:
            status = "OK" if r.ok else ("MISSING" if r.scan is not None and r.scan.missing_dirs else "BROKEN")
            if r.scan is None or r.scan.missing_dirs:
                lines.append(f"  {r.split:<6}{status:<9}{'-':>8}{'-':>8}{'-':>8}{'-':>10}{'-':>10}{'-':>11}")
                continue
            s = r.scan
            lines.append(
                f"  {r.split:<6}{status:<9}{s.num_images:>8}{s.num_labels:>8}{len(s.pairs):>8}"
                f"{len(s.images_without_label):>10}{len(s.labels_without_image):>10}{len(r.size_mismatches):>11}"
            )
        for r in rows:
            prefix = f"  [{r.split}] {r.dataset}"
            if r.scan is not None:
                for d in r.scan.required_dirs:
                    lines.append(f"{prefix}: {'found  ' if d.is_dir() else 'MISSING'} {_relative(d, root)}/")
                for note in r.scan.notes:
                    lines.append(f"{prefix}: note: {note}")
            for problem in r.problems():
                lines.append(f"{prefix}: PROBLEM: {problem}")
        lines.append("")
    usable = sum(r.ok for r in reports)
    lines.append(f"{usable} of {len(reports)} dataset splits usable under {root}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m cat_seg.data.validate``."""
    parser = argparse.ArgumentParser(
        description="Report, per SemLA domain, which datasets are usable under a root."
    )
    parser.add_argument(
        "--root", type=Path, default=None, help="dataset root (default: $DETECTRON2_DATASETS)"
    )
    parser.add_argument(
        "--domains",
        nargs="+",
        default=None,
        help=f"domains to check (default: all {len(DOMAINS)}, or those of --domain_spec when given)",
    )
    parser.add_argument(
        "--domain_spec",
        nargs="+",
        default=[],
        type=Path,
        metavar="FILE",
        help="domain spec file(s) of your own domains to check (their folders are in the spec; no --root needed)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=list(SPLITS),
        choices=list(SPLITS),
        help="splits to check (default: train val)",
    )
    parser.add_argument(
        "--max-size-checks",
        type=int,
        default=-1,
        help="compare image/label sizes for at most this many pairs per split (-1: all, 0: none; default: -1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Validate and print the report; returns 0 (all usable), 1 (something unusable or an error) or 2 (usage)."""
    from ..cli import add_debug_flag, report_errors

    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        try:
            own = [register_domain_spec_file(path).name for path in args.domain_spec]
        except (DomainSpecError, FileNotFoundError) as e:
            print(f"cat_seg.data.validate: error: {e}", file=sys.stderr)
            return 1
        domains = args.domains or own or None
        only_own = bool(own) and all(domain_spec(d) is not None for d in domains or [])
        try:
            root = args.root if args.root is not None else (Path.cwd() if only_own else default_root())
        except ValueError as e:  # no root given: a usage error
            print(f"cat_seg.data.validate: error: {e}", file=sys.stderr)
            return 2
        try:
            reports = validate_root(root, domains, args.splits, max_size_checks=args.max_size_checks)
        except UnknownDatasetError as e:
            print(f"cat_seg.data.validate: error: {e}", file=sys.stderr)
            return 2
        print(format_reports(reports, Path(root)))
        return 0 if all(r.ok for r in reports) else 1

    return report_errors("cat_seg.data.validate", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
