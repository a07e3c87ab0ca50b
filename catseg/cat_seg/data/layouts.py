"""On-disk layouts of the 10 dataset families behind the 20 SemLA domains.

Every family has a *scanner* that lists what is on disk without raising (the ``validate`` command
reports from it) and the loaders turn a clean scan into records (raising on any problem). Paths follow
the original SemLA code; ``root`` is ``$DETECTRON2_DATASETS`` (no trailing slash needed).

========== ===================================================================================
family     images -> labels (``<split>``: train / val unless stated)
========== ===================================================================================
acdc       acdc/rgb_anon/<c>/<split>/<seq>/X_rgb_anon.png -> acdc/gt/<c>/<split>/<seq>/X_gt_labelTrainIds.png
           (X_rgb_ref_anon.png, if present, -> X_gt_ref_labelTrainIds.png, as the original pairs them)
muses      muses/frame_camera/<split>/<w>/<t>/X_frame_camera.png -> muses/gt_semantic/<split>/<w>/<t>/X_gt_labelTrainIds.png
cityscapes cityscapes/leftImg8bit/<split>/<city>/X_leftImg8bit.png -> cityscapes/gtFine/<split>/<city>/X_gtFine_labelTrainIds.png
bdd        bdd100k/images/10k/<split>/X.jpg -> bdd100k/labels/sem_seg/masks/<split>/X.png
mapillary  mapillary_vistas/<split>/images/X.jpg -> mapillary_vistas/<split>/labels/X.png  (split folders train / val)
ade20k     ADEChallengeData2016/images/<training|validation>/X.jpg -> .../annotations_detectron2/<...>/X.png
idd        IDD_Segmentation/leftImg8bit/<split>/<folder>/X_leftImg8bit.{png,jpg} -> .../gtFine/<split>/<folder>/X_gtFine_labellevel3Ids.png
pascal_ctx59 pascal_ctx_d2/images/<training|validation>/X.jpg -> pascal_ctx_d2/annotations_ctx59/<...>/X.png
nyu        nyudv2/<train|test>.txt lines "rgb/X.png,masks/X.png,depth/X.png" (relative to nyudv2/)
coconut    coco/<train|val>2017/X.jpg -> coco/panoptic_semseg_<train|val>2017/X.png (list from
           coco/annotations/panoptic_<split>2017.json when present)
========== ===================================================================================
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import DatasetError, MissingDataError, image_sizes

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_NYU_SPLITS_DIR = REPO_ROOT / "misc" / "nyudv2_splits"

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
MUSES_WEATHERS = ("clear", "fog", "rain", "snow")
MUSES_TIMES = ("day", "night")
SPLITS = ("train", "val")

_MAX_LISTED = 5  # examples listed per problem in error messages


@dataclass
class Pair:
    """One image and its training label, plus layout-specific extra record fields."""

    image: Path
    label: Path
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scan:
    """What a scanner found for one dataset (never raises; ``problems()`` lists what is wrong)."""

    dataset: str
    root: Path
    image_dir: Path
    label_dir: Path
    required_dirs: list[Path]
    pairs: list[Pair] = field(default_factory=list)
    num_images: int = 0
    num_labels: int = 0
    images_without_label: list[Path] = field(default_factory=list)
    labels_without_image: list[Path] = field(default_factory=list)
    missing_files: list[Path] = field(default_factory=list)
    unexpected_files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def missing_dirs(self) -> list[Path]:
        """Required folders that do not exist."""
        return [d for d in self.required_dirs if not d.is_dir()]

    def problems(self) -> list[str]:
        """Human-readable problems, empty when the dataset is usable."""
        out: list[str] = []
        for d in self.missing_dirs:
            out.append(f"expected folder {d} does not exist")
        if self.missing_dirs:
            return out
        if not self.pairs and not self.images_without_label:
            out.append(f"no images found in {self.image_dir}")
        for what, paths in (
            ("image(s) without a label", self.images_without_label),
            ("label(s) without an image", self.labels_without_image),
            ("listed file(s) missing", self.missing_files),
            ("unexpected file(s)", self.unexpected_files),
        ):
            if paths:
                shown = ", ".join(str(p) for p in paths[:_MAX_LISTED])
                more = f" (and {len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else ""
                out.append(f"{len(paths)} {what}: {shown}{more}")
        return out

    def raise_if_unusable(self) -> None:
        """Raise ``MissingDataError``/``DatasetError`` naming the dataset and the offending paths."""
        problems = self.problems()
        if not problems:
            return
        message = f"dataset {self.dataset!r} (root {self.root}): " + "; ".join(problems)
        if self.missing_dirs or self.images_without_label or self.missing_files:
            raise MissingDataError(message)
        raise DatasetError(message)


# ----------------------------------------------------------------------------------------------------
# listing helpers


def _files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Sorted regular files directly in ``folder`` whose names end with one of ``suffixes`` (dotfiles skipped)."""
    if not folder.is_dir():
        return []
    suffixes = tuple(suffixes)
    with os.scandir(folder) as entries:  # d_type avoids one stat per file on large folders
        names = [
            e.name
            for e in entries
            if e.is_file() and not e.name.startswith(".") and e.name.endswith(suffixes)
        ]
    return [folder / n for n in sorted(names)]


def _subdirs(folder: Path) -> list[Path]:
    """Sorted sub-folders of ``folder`` (dotfolders skipped)."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    return [folder / n for n in sorted(names)]


def _scan_by_suffix(
    scan: Scan,
    *,
    nested: bool,
    image_to_label: dict[str, str],
    label_ids_suffix: dict[str, str] | None = None,
) -> Scan:
    """Pair ``<prefix><image suffix>`` images with ``<prefix><label suffix>`` labels (Cityscapes-style).

    Args:
        scan: scan to fill; its ``image_dir``/``label_dir`` are the split folders.
        nested: images live one folder deeper (``<city>``/``<seq>``/``<folder>``), mirrored in labels.
        image_to_label: image-name suffix -> training-label suffix. Any other file in an image folder is
            unexpected (the original asserts on it).
        label_ids_suffix: image-name suffix -> ``*_labelIds.png`` suffix, stored as ``label_ids_file_name``
            (used by the cityscapesScripts-style evaluation; not required to exist).
    """
    label_suffixes = tuple(set(image_to_label.values()))
    label_folders = _subdirs(scan.label_dir) if nested else [scan.label_dir]
    labels = {p for folder in label_folders for p in _files(folder, label_suffixes)}
    scan.num_labels = len(labels)
    seen: set[Path] = set()
    if nested:  # files directly in the split folder are misplaced (they belong in <city>/<seq>/<folder>)
        scan.unexpected_files.extend(_files(scan.image_dir, (".png", ".jpg", ".jpeg")))
    for folder in _subdirs(scan.image_dir) if nested else [scan.image_dir]:
        label_folder = scan.label_dir / folder.relative_to(scan.image_dir)
        for path in _files(folder, (".png", ".jpg", ".jpeg")):
            suffix = next((s for s in image_to_label if path.name.endswith(s)), None)
            if suffix is None:
                scan.unexpected_files.append(path)
                continue
            scan.num_images += 1
            prefix = path.name[: -len(suffix)]
            label = label_folder / (prefix + image_to_label[suffix])
            if label not in labels:
                scan.images_without_label.append(path)
                continue
            seen.add(label)
            extra: dict[str, Any] = {}
            if label_ids_suffix is not None:
                extra["label_ids_file_name"] = str(label_folder / (prefix + label_ids_suffix[suffix]))
            scan.pairs.append(Pair(path, label, extra))
    scan.labels_without_image = sorted(labels - seen)
    return scan


def _scan_by_stem(scan: Scan, *, image_ext: str, label_ext: str) -> Scan:
    """Pair ``X<image_ext>`` with ``X<label_ext>`` in two flat folders (detectron2 ``load_sem_seg`` style)."""
    images = _files(scan.image_dir, (image_ext,))
    labels = _files(scan.label_dir, (label_ext,))
    scan.num_images, scan.num_labels = len(images), len(labels)
    by_stem = {p.name[: -len(label_ext)]: p for p in labels}
    image_stems = set()
    for image in images:
        stem = image.name[: -len(image_ext)]
        image_stems.add(stem)
        label = by_stem.get(stem)
        if label is None:
            scan.images_without_label.append(image)
        else:
            scan.pairs.append(Pair(image, label))
    scan.labels_without_image.extend(p for s, p in sorted(by_stem.items()) if s not in image_stems)
    return scan


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ----------------------------------------------------------------------------------------------------
# scanners, one per family


def scan_acdc(root: Path, *, split: str, condition: str, dataset: str = "") -> Scan:
    """ACDC ``<condition>`` (fog/night/rain/snow), nested by sequence (``GOPR0475/...``)."""
    _check_split(split)
    if condition not in ACDC_CONDITIONS:
        raise ValueError(f"ACDC condition must be one of {ACDC_CONDITIONS}, got {condition!r}")
    root = Path(root)
    image_dir = root / "acdc" / "rgb_anon" / condition / split
    label_dir = root / "acdc" / "gt" / condition / split
    scan = Scan(
        dataset or f"acdc-{condition}_sem_seg_{split}", root, image_dir, label_dir, [image_dir, label_dir]
    )
    return _scan_by_suffix(
        scan,
        nested=True,
        image_to_label={
            "rgb_anon.png": "gt_labelTrainIds.png",
            "rgb_ref_anon.png": "gt_ref_labelTrainIds.png",
        },
        label_ids_suffix={"rgb_anon.png": "gt_labelIds.png", "rgb_ref_anon.png": "gt_ref_labelIds.png"},
    )


def scan_muses(root: Path, *, split: str, weather: str, time: str, dataset: str = "") -> Scan:
    """MUSES ``<weather>-<time>``, flat folders (``REC0006_frame_040526_frame_camera.png``)."""
    _check_split(split)
    if weather not in MUSES_WEATHERS or time not in MUSES_TIMES:
        raise ValueError(f"MUSES condition must be in {MUSES_WEATHERS} x {MUSES_TIMES}, got {weather}-{time}")
    root = Path(root)
    image_dir = root / "muses" / "frame_camera" / split / weather / time
    label_dir = root / "muses" / "gt_semantic" / split / weather / time
    name = dataset or f"muses-{weather}-{time}_sem_seg_{split}"
    scan = Scan(name, root, image_dir, label_dir, [image_dir, label_dir])
    return _scan_by_suffix(
        scan,
        nested=False,
        image_to_label={"frame_camera.png": "gt_labelTrainIds.png"},
        label_ids_suffix={"frame_camera.png": "gt_labelIds.png"},
    )


def scan_cityscapes(root: Path, *, split: str, dataset: str = "") -> Scan:
    """Cityscapes fine annotations, nested by city."""
    _check_split(split)
    root = Path(root)
    image_dir = root / "cityscapes" / "leftImg8bit" / split
    label_dir = root / "cityscapes" / "gtFine" / split
    scan = Scan(dataset or f"cs-normal_sem_seg_{split}", root, image_dir, label_dir, [image_dir, label_dir])
    return _scan_by_suffix(
        scan,
        nested=True,
        image_to_label={"leftImg8bit.png": "gtFine_labelTrainIds.png"},
        label_ids_suffix={"leftImg8bit.png": "gtFine_labelIds.png"},
    )


def scan_idd(root: Path, *, split: str, dataset: str = "") -> Scan:
    """IDD segmentation with level-3 ids (``*_gtFine_labellevel3Ids.png``), nested by folder."""
    _check_split(split)
    root = Path(root)
    image_dir = root / "IDD_Segmentation" / "leftImg8bit" / split
    label_dir = root / "IDD_Segmentation" / "gtFine" / split
    scan = Scan(dataset or f"idd_sem_seg_{split}", root, image_dir, label_dir, [image_dir, label_dir])
    level3 = "_gtFine_labellevel3Ids.png"
    return _scan_by_suffix(
        scan, nested=True, image_to_label={"_leftImg8bit.png": level3, "_leftImg8bit.jpg": level3}
    )


def scan_bdd(root: Path, *, split: str, dataset: str = "") -> Scan:
    """BDD100K 10k semantic segmentation (``.jpg`` images, ``.png`` trainId masks)."""
    _check_split(split)
    root = Path(root)
    image_dir = root / "bdd100k" / "images" / "10k" / split
    label_dir = root / "bdd100k" / "labels" / "sem_seg" / "masks" / split
    scan = Scan(dataset or f"bdd_sem_seg_{split}", root, image_dir, label_dir, [image_dir, label_dir])
    return _scan_by_stem(scan, image_ext=".jpg", label_ext=".png")


def scan_mapillary(root: Path, *, split: str, dataset: str = "") -> Scan:
    """Mapillary Vistas v1.2; split folders are named ``train`` / ``val`` (the official
    ``training`` / ``validation`` must be renamed or symlinked, as in the original)."""
    _check_split(split)
    root = Path(root)
    image_dir = root / "mapillary_vistas" / split / "images"
    label_dir = root / "mapillary_vistas" / split / "labels"
    scan = Scan(dataset or f"mv_sem_seg_{split}", root, image_dir, label_dir, [image_dir, label_dir])
    return _scan_by_stem(scan, image_ext=".jpg", label_ext=".png")


def scan_ade20k(root: Path, *, split: str, dataset: str = "") -> Scan:
    """ADE20K-150 with ``annotations_detectron2`` (0-149, 255; see ``prepare_ade20k``)."""
    _check_split(split)
    folder = {"train": "training", "val": "validation"}[split]
    root = Path(root)
    image_dir = root / "ADEChallengeData2016" / "images" / folder
    label_dir = root / "ADEChallengeData2016" / "annotations_detectron2" / folder
    scan = Scan(dataset or f"a150_sem_seg_{split}", root, image_dir, label_dir, [image_dir, label_dir])
    return _scan_by_stem(scan, image_ext=".jpg", label_ext=".png")


def scan_pascal_ctx59(root: Path, *, split: str, dataset: str = "") -> Scan:
    """PASCAL-Context-59 as prepared by CAT-Seg's ``prepare_pascal_ctx_sem_seg.py`` (0-58, 255)."""
    _check_split(split)
    folder = {"train": "training", "val": "validation"}[split]
    root = Path(root)
    image_dir = root / "pascal_ctx_d2" / "images" / folder
    label_dir = root / "pascal_ctx_d2" / "annotations_ctx59" / folder
    scan = Scan(dataset or f"pc59_sem_seg_{split}", root, image_dir, label_dir, [image_dir, label_dir])
    return _scan_by_stem(scan, image_ext=".jpg", label_ext=".png")


def nyu_split_file(root: Path, split: str, splits_dir: Path | None = None) -> Path:
    """The NYUv2 split file for ``split`` (train -> ``train.txt``, val -> ``test.txt``).

    Resolution order: ``splits_dir`` when given; else ``<root>/nyudv2/<file>`` when it exists (where the
    original reads it); else the repository's ``misc/nyudv2_splits/<file>`` (795 / 654 lines).
    """
    _check_split(split)
    name = "train.txt" if split == "train" else "test.txt"
    if splits_dir is not None:
        return Path(splits_dir) / name
    in_root = Path(root) / "nyudv2" / name
    return in_root if in_root.is_file() else DEFAULT_NYU_SPLITS_DIR / name


def scan_nyu(root: Path, *, split: str, splits_dir: Path | None = None, dataset: str = "") -> Scan:
    """NYUv2 (40 classes) listed by a split file of ``rgb/X.png,masks/X.png,depth/X.png`` lines."""
    root = Path(root)
    base = root / "nyudv2"
    split_file = nyu_split_file(root, split, splits_dir)
    scan = Scan(
        dataset or f"nyu_sem_seg_{split}",
        root,
        base / "rgb",
        base / "masks",
        [base, base / "rgb", base / "masks"],
    )
    scan.notes.append(f"split file {split_file}")
    if not split_file.is_file():
        scan.missing_files.append(split_file)
        return scan
    if scan.missing_dirs:
        return scan
    lines = [ln.strip() for ln in split_file.read_text().splitlines()]
    for lineno, line in enumerate(lines, start=1):
        if not line:
            continue
        parts = line.split(",")
        if len(parts) != 3:
            raise DatasetError(
                f"{split_file}:{lineno}: expected 'rgb/X.png,masks/X.png,depth/X.png', got {line!r}"
            )
        rgb, mask, depth = (base / p for p in parts)
        scan.num_images += 1
        image_ok, label_ok = rgb.is_file(), mask.is_file()
        scan.num_labels += int(label_ok)
        if not image_ok:
            scan.missing_files.append(rgb)
        elif not label_ok:
            scan.images_without_label.append(rgb)
        else:
            scan.pairs.append(Pair(rgb, mask, {"depth_name": str(depth), "image_id": lineno - 1}))
    return scan


def scan_coconut(root: Path, *, split: str, dataset: str = "") -> Scan:
    """COCONut-L semantic labels (133 contiguous ids) next to the COCO images.

    When ``coco/annotations/panoptic_<split>2017.json`` exists, its ``annotations`` list defines the
    images (as in the original, including ``object365_file_name`` entries); otherwise every label PNG in
    ``panoptic_semseg_<split>2017`` defines one image. Extra images without a label are expected (the image
    folder is shared with other COCO tasks) and are not an error.
    """
    _check_split(split)
    root = Path(root)
    coco = root / "coco"
    image_dir, label_dir = coco / f"{split}2017", coco / f"panoptic_semseg_{split}2017"
    scan = Scan(dataset or f"coconutL_sem_seg_{split}", root, image_dir, label_dir, [image_dir, label_dir])
    if scan.missing_dirs:
        return scan
    json_file = coco / "annotations" / f"panoptic_{split}2017.json"
    if json_file.is_file():
        scan.notes.append(f"file list from {json_file}")
        try:
            annotations = json.loads(json_file.read_text())["annotations"]
        except (ValueError, KeyError) as e:
            raise DatasetError(
                f"{json_file}: not a COCO panoptic JSON with an 'annotations' list ({e})"
            ) from e
        entries = []
        for ann in annotations:
            name = ann["object365_file_name"] + ".png" if "object365_file_name" in ann else ann["file_name"]
            extra = {
                "image_id": int(ann["image_id"]),
                "pan_seg_file_name": str(coco / f"panoptic_{split}2017" / name),
            }
            entries.append((name, extra))
    else:
        scan.notes.append(f"no {json_file.name}: one image per label PNG in {label_dir}")
        entries = [(p.name, {}) for p in _files(label_dir, (".png",))]
    scan.num_labels = len(_files(label_dir, (".png",)))
    for name, extra in entries:
        image = image_dir / (Path(name).stem + ".jpg")
        label = label_dir / name
        scan.num_images += int(image.is_file())
        if not image.is_file():
            scan.missing_files.append(image)
        elif not label.is_file():
            scan.images_without_label.append(image)
        else:
            scan.pairs.append(Pair(image, label, extra))
    return scan


def _walk(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Files under ``folder`` (recursively, dot-names skipped) whose names end with one of ``suffixes``."""
    found: list[Path] = []
    for here, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(here) / n for n in names if not n.startswith(".") and n.endswith(tuple(suffixes))]
    return sorted(found)


def scan_spec(
    root: Path,
    *,
    split: str,
    images: str,
    labels: str,
    image_suffixes: tuple[str, ...],
    label_suffix: str,
    dataset: str = "",
) -> Scan:
    """A domain spec's split (``cat_seg.data.domain_spec``): absolute folders, ``root`` is not used.

    ``images`` is a folder searched recursively for names ending with one of ``image_suffixes`` or a glob
    pattern; the label of ``<image dir>/<sub>/<X><suffix>`` is ``<labels>/<sub>/<X><label_suffix>``. When
    images and labels share a folder, the label files are not taken for images.
    """
    _check_split(split)
    from .domain_spec import SplitSpec

    where = SplitSpec(images, labels, image_suffixes, label_suffix)
    image_dir, label_dir = where.image_dir, Path(labels)
    scan = Scan(dataset, Path(root), image_dir, label_dir, [image_dir, label_dir])
    if scan.missing_dirs:
        return scan
    label_files = set(_walk(label_dir, (label_suffix,)))
    scan.num_labels = len(label_files)
    if where.is_glob:
        import glob

        candidates = sorted(Path(p) for p in glob.glob(images, recursive=True) if Path(p).is_file())
        scan.notes.append(f"images matching {images}")
    else:
        candidates = _walk(image_dir, image_suffixes)
    seen: set[Path] = set()
    for image in candidates:
        if image in label_files:  # images and labels in one folder
            continue
        suffix = max((s for s in image_suffixes if image.name.endswith(s)), key=len, default=None)
        if suffix is None:
            scan.unexpected_files.append(image)
            continue
        scan.num_images += 1
        relative = image.parent.relative_to(image_dir)
        label = label_dir / relative / (image.name[: -len(suffix)] + label_suffix)
        if label not in label_files:
            scan.images_without_label.append(image)
            continue
        seen.add(label)
        scan.pairs.append(Pair(image, label))
    unmatched = sorted(label_files - seen - {p.image for p in scan.pairs})
    if where.is_glob:  # a glob may pick some of a folder's images on purpose (e.g. a split by name)
        if unmatched:
            scan.notes.append(
                f"{len(unmatched)} label(s) in {label_dir} belong to no image matching the pattern"
            )
    else:
        scan.labels_without_image = unmatched
    return scan


# ----------------------------------------------------------------------------------------------------
# records


def records_from_scan(scan: Scan, *, num_threads: int = 8) -> list[dict[str, Any]]:
    """Turn a clean scan into detectron2-style records, sorted by ``file_name``.

    Args:
        scan: result of a scanner.
        num_threads: threads reading image headers for height/width.
    Returns:
        one dict per image: ``file_name``, ``sem_seg_file_name``, ``height``, ``width`` (read from the image
        header, EXIF-aware), ``dataset`` and the layout's extras (``label_ids_file_name``, ``depth_name``,
        ``image_id``, ``pan_seg_file_name``).
    Raises:
        MissingDataError / DatasetError: the scan found a problem (missing folder, unpaired files...).
    """
    scan.raise_if_unusable()
    pairs = sorted(scan.pairs, key=lambda p: str(p.image))
    sizes = image_sizes([p.image for p in pairs], num_threads=num_threads)
    records = []
    for pair, (height, width) in zip(pairs, sizes):
        record = {
            "file_name": str(pair.image),
            "sem_seg_file_name": str(pair.label),
            "height": height,
            "width": width,
            "dataset": scan.dataset,
        }
        record.update(pair.extra)
        records.append(record)
    logger.info("dataset %s: %d images from %s", scan.dataset, len(records), scan.image_dir)
    return records


SCANNERS = {
    "acdc": scan_acdc,
    "muses": scan_muses,
    "cityscapes": scan_cityscapes,
    "bdd": scan_bdd,
    "mapillary": scan_mapillary,
    "ade20k": scan_ade20k,
    "idd": scan_idd,
    "pascal_ctx59": scan_pascal_ctx59,
    "nyu": scan_nyu,
    "coconut": scan_coconut,
    "spec": scan_spec,
}
"""Layout (family) name -> scanner ``(root, *, split, dataset, **family_kwargs) -> Scan``."""


def load_layout(
    root: Path, *, layout: str, split: str, dataset: str = "", **kwargs: Any
) -> list[dict[str, Any]]:
    """Scan one layout under ``root`` and return its records (raising on any problem)."""
    try:
        scanner = SCANNERS[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(SCANNERS)}") from None
    return records_from_scan(scanner(Path(root), split=split, dataset=dataset, **kwargs))
