"""Tiny synthetic datasets written in exactly the real on-disk layouts (for tests and smoke runs).

Each writer creates both splits of one layout under ``root`` with the real folder names, file-name
patterns, image formats (PNG vs JPEG) and label encodings (8-bit single-channel PNGs of ids, palette
PNGs for Mapillary Vistas, ``*_labelIds.png`` consistent with ``*_labelTrainIds.png`` for the
Cityscapes family), including ignore pixels. Images are 40-80 px on each side, not all equal, so that
resizing code is exercised. Everything is drawn from ``numpy.random.default_rng(seed)``.

Command line::

    python -m cat_seg.data.synthetic --layout acdc --root /tmp/ds --num-images 3 --seed 0
    python -m cat_seg.data.synthetic --layout all --root /tmp/ds
    python -m cat_seg.data.synthetic --layout own --root /tmp/own --num-images 3   # a domain spec + its data
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .cityscapes_labels import label_ids_to_train_ids, valid_label_ids
from .io import write_label
from .layouts import ACDC_CONDITIONS, MUSES_TIMES, MUSES_WEATHERS, SPLITS

logger = logging.getLogger(__name__)

MIN_SIDE, MAX_SIDE = 40, 80
_IGNORE_FRACTION = 0.08

Writer = Callable[..., list[Path]]


# ----------------------------------------------------------------------------------------------------
# random content


def _random_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width), each in [MIN_SIDE, MAX_SIDE]."""
    h, w = rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2)
    return int(h), int(w)


def _random_label(
    rng: np.random.Generator, size: tuple[int, int], ids: np.ndarray, ignore: int | None
) -> np.ndarray:
    """(H, W) int64 map of blocks of random ``ids`` (at least two different ones) plus ignore pixels."""
    h, w = size
    gh, gw = rng.integers(2, 6, size=2)
    while True:
        grid = rng.choice(ids, size=(gh, gw))
        if np.unique(grid).size > 1:
            break
    rows = np.minimum(np.arange(h) * gh // h, gh - 1)
    cols = np.minimum(np.arange(w) * gw // w, gw - 1)
    label = grid[rows][:, cols].astype(np.int64)
    if ignore is not None:
        label[rng.random(size) < _IGNORE_FRACTION] = ignore
    return label


def _random_image(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image: a colour per label id plus noise."""
    palette = rng.integers(0, 256, size=(256, 3))
    noise = rng.integers(-20, 21, size=(*label.shape, 3))
    return np.clip(palette[label % 256] + noise, 0, 255).astype(np.uint8)


def _save_image(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(image).save(path, quality=92)
    else:
        Image.fromarray(image).save(path)
    return path


def _save_label(path: Path, label: np.ndarray, palette: list[int] | None = None) -> Path:
    write_label(path, label, palette=palette)
    return path


def _pair(
    rng: np.random.Generator, image_path: Path, label_path: Path, ids: np.ndarray, ignore: int | None, **kw
) -> list[Path]:
    """Write one random image and its label map of ``ids`` (+ ``ignore``); returns both paths."""
    label = _random_label(rng, _random_size(rng), ids, ignore)
    return [_save_image(image_path, _random_image(rng, label)), _save_label(label_path, label, **kw)]


def _cityscapes_pair(
    rng: np.random.Generator, image_path: Path, train_ids_path: Path, label_ids_path: Path
) -> list[Path]:
    """Image + ``*_labelIds.png`` + the ``*_labelTrainIds.png`` derived from it.

    Blocks use evaluated labelIds (at least two train ids); scattered pixels use labelIds that are ignored
    in evaluation (e.g. 0 unlabeled, 1 ego vehicle), which become 255 in the trainId map.
    """
    ids = valid_label_ids()
    train = label_ids_to_train_ids(ids)
    size = _random_size(rng)
    label_ids = _random_label(rng, size, ids[train != 255], ignore=None)
    scattered = rng.random(size) < _IGNORE_FRACTION
    label_ids[scattered] = rng.choice(ids[train == 255], size=int(scattered.sum()))
    train_ids = label_ids_to_train_ids(label_ids)
    return [
        _save_image(image_path, _random_image(rng, label_ids)),
        _save_label(label_ids_path, label_ids),
        _save_label(train_ids_path, train_ids),
    ]


# ----------------------------------------------------------------------------------------------------
# writers, one per layout


def write_acdc(
    root: Path,
    num_images: int,
    rng: np.random.Generator,
    *,
    conditions: Sequence[str] = ACDC_CONDITIONS,
    with_ref: bool = False,
) -> list[Path]:
    """``acdc/rgb_anon/<c>/<split>/<seq>/GOPR0475_frame_000041_rgb_anon.png`` + ``acdc/gt/...``.

    Args:
        conditions: subset of fog/night/rain/snow.
        with_ref: also write one ``*_rgb_ref_anon.png`` (with ``*_gt_ref_label*Ids.png``) per split.
    """
    written: list[Path] = []
    for c in conditions:
        if c not in ACDC_CONDITIONS:
            raise ValueError(f"unknown ACDC condition {c!r}; known: {ACDC_CONDITIONS}")
        for split in SPLITS:
            for i in range(num_images):
                seq = f"GOPR04{75 + i % 2}"
                stem = f"{seq}_frame_{41 + 17 * i:06d}"
                img_dir = root / "acdc" / "rgb_anon" / c / split / seq
                gt_dir = root / "acdc" / "gt" / c / split / seq
                written += _cityscapes_pair(
                    rng,
                    img_dir / f"{stem}_rgb_anon.png",
                    gt_dir / f"{stem}_gt_labelTrainIds.png",
                    gt_dir / f"{stem}_gt_labelIds.png",
                )
            if with_ref:
                stem, seq = "GOPR0475_frame_000999", "GOPR0475"
                img_dir = root / "acdc" / "rgb_anon" / c / split / seq
                gt_dir = root / "acdc" / "gt" / c / split / seq
                written += _cityscapes_pair(
                    rng,
                    img_dir / f"{stem}_rgb_ref_anon.png",
                    gt_dir / f"{stem}_gt_ref_labelTrainIds.png",
                    gt_dir / f"{stem}_gt_ref_labelIds.png",
                )
    return written


def write_muses(
    root: Path, num_images: int, rng: np.random.Generator, *, conditions: Sequence[str] | None = None
) -> list[Path]:
    """``muses/frame_camera/<split>/<w>/<t>/REC0006_frame_040526_frame_camera.png`` + ``gt_semantic``.

    Args:
        conditions: ``"<weather>-<time>"`` strings (default: all 8).
    """
    conditions = conditions or [f"{w}-{t}" for w in MUSES_WEATHERS for t in MUSES_TIMES]
    written: list[Path] = []
    for cond in conditions:
        weather, _, time = cond.partition("-")
        if weather not in MUSES_WEATHERS or time not in MUSES_TIMES:
            raise ValueError(f"unknown MUSES condition {cond!r}; expected <weather>-<time>")
        for split in SPLITS:
            for i in range(num_images):
                stem = f"REC{6 + i % 3:04d}_frame_{40526 + 13 * i:06d}"
                img_dir = root / "muses" / "frame_camera" / split / weather / time
                gt_dir = root / "muses" / "gt_semantic" / split / weather / time
                written += _cityscapes_pair(
                    rng,
                    img_dir / f"{stem}_frame_camera.png",
                    gt_dir / f"{stem}_gt_labelTrainIds.png",
                    gt_dir / f"{stem}_gt_labelIds.png",
                )
    return written


def write_cityscapes(root: Path, num_images: int, rng: np.random.Generator) -> list[Path]:
    """``cityscapes/leftImg8bit/<split>/<city>/aachen_000000_000019_leftImg8bit.png`` + ``gtFine``
    (``_gtFine_labelIds.png`` and the matching ``_gtFine_labelTrainIds.png``)."""
    cities = {"train": ("aachen", "bochum"), "val": ("frankfurt", "lindau")}
    written: list[Path] = []
    for split in SPLITS:
        for i in range(num_images):
            city = cities[split][i % 2]
            stem = f"{city}_{i // 2:06d}_{19 + 10 * i:06d}"
            written += _cityscapes_pair(
                rng,
                root / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                root / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png",
                root / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
            )
    return written


def write_bdd(root: Path, num_images: int, rng: np.random.Generator) -> list[Path]:
    """``bdd100k/images/10k/<split>/0a0a0b1a-7c39d841.jpg`` + ``labels/sem_seg/masks/<split>/*.png``."""
    written: list[Path] = []
    for split in SPLITS:
        for _ in range(num_images):
            stem = "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=2))
            written += _pair(
                rng,
                root / "bdd100k" / "images" / "10k" / split / f"{stem}.jpg",
                root / "bdd100k" / "labels" / "sem_seg" / "masks" / split / f"{stem}.png",
                np.arange(19),
                255,
            )
    return written


_MV_PALETTE = [int(v) for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 151) % 256)]


def write_mapillary(root: Path, num_images: int, rng: np.random.Generator) -> list[Path]:
    """``mapillary_vistas/<split>/images/<key>.jpg`` + ``labels/<key>.png`` (palette PNG, ids 0-64, 65 ignore)."""
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"))
    written: list[Path] = []
    for split in SPLITS:
        for _ in range(num_images):
            key = "".join(rng.choice(alphabet, size=22))
            written += _pair(
                rng,
                root / "mapillary_vistas" / split / "images" / f"{key}.jpg",
                root / "mapillary_vistas" / split / "labels" / f"{key}.png",
                np.arange(65),
                65,
                palette=_MV_PALETTE,
            )
    return written


def write_ade20k(
    root: Path, num_images: int, rng: np.random.Generator, *, official: bool = True
) -> list[Path]:
    """``ADEChallengeData2016/images/<training|validation>/ADE_train_00000001.jpg`` + ``annotations_detectron2``.

    Args:
        official: also write the official ``annotations/`` (ids + 1, 0 = other) that ``prepare_ade20k``
            converts.
    """
    written: list[Path] = []
    base = root / "ADEChallengeData2016"
    for folder, tag in (("training", "train"), ("validation", "val")):
        for i in range(num_images):
            stem = f"ADE_{tag}_{i + 1:08d}"
            image, label = _pair(
                rng,
                base / "images" / folder / f"{stem}.jpg",
                base / "annotations_detectron2" / folder / f"{stem}.png",
                np.arange(150),
                255,
            )
            written += [image, label]
            if official:
                d2 = np.asarray(Image.open(label)).astype(np.int64)
                written.append(_save_label(base / "annotations" / folder / f"{stem}.png", (d2 + 1) % 256))
    return written


def write_idd(root: Path, num_images: int, rng: np.random.Generator) -> list[Path]:
    """``IDD_Segmentation/leftImg8bit/<split>/<folder>/000123_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labellevel3Ids.png``."""
    written: list[Path] = []
    for split in SPLITS:
        for i in range(num_images):
            folder, stem = str(i % 2), f"{100 + 7 * i:06d}"
            written += _pair(
                rng,
                root / "IDD_Segmentation" / "leftImg8bit" / split / folder / f"{stem}_leftImg8bit.png",
                root / "IDD_Segmentation" / "gtFine" / split / folder / f"{stem}_gtFine_labellevel3Ids.png",
                np.arange(26),
                255,
            )
    return written


def write_pascal_ctx59(root: Path, num_images: int, rng: np.random.Generator) -> list[Path]:
    """``pascal_ctx_d2/images/<training|validation>/2008_000002.jpg`` + ``annotations_ctx59`` (0-58, 255)."""
    written: list[Path] = []
    for folder, offset in (("training", 2), ("validation", 500)):
        for i in range(num_images):
            stem = f"2008_{offset + 3 * i:06d}"
            written += _pair(
                rng,
                root / "pascal_ctx_d2" / "images" / folder / f"{stem}.jpg",
                root / "pascal_ctx_d2" / "annotations_ctx59" / folder / f"{stem}.png",
                np.arange(59),
                255,
            )
    return written


def write_nyu(root: Path, num_images: int, rng: np.random.Generator) -> list[Path]:
    """``nyudv2/{rgb,masks,depth}/000003.png`` + split files ``nyudv2/{train,test}.txt`` listing them."""
    base = root / "nyudv2"
    ids = rng.permutation(np.arange(1, 2 * num_images + 1))
    split_ids = {"train.txt": sorted(ids[:num_images]), "test.txt": sorted(ids[num_images:])}
    written: list[Path] = []
    for split_file, numbers in split_ids.items():
        lines = []
        for n in numbers:
            name = f"{int(n):06d}.png"
            written += _pair(rng, base / "rgb" / name, base / "masks" / name, np.arange(40), 255)
            width, height = Image.open(base / "rgb" / name).size
            depth = rng.integers(500, 10000, size=(height, width)).astype(np.uint16)  # millimetres, 16-bit
            (base / "depth").mkdir(parents=True, exist_ok=True)
            Image.fromarray(depth).save(base / "depth" / name)
            written.append(base / "depth" / name)
            lines.append(f"rgb/{name},masks/{name},depth/{name}")
        (base / split_file).write_text("\n".join(lines) + "\n")
        written.append(base / split_file)
    return written


def write_coconut(root: Path, num_images: int, rng: np.random.Generator) -> list[Path]:
    """``coco/<split>2017/000000000009.jpg`` + ``coco/panoptic_semseg_<split>2017/*.png`` (0-132, 255),
    ``coco/annotations/panoptic_<split>2017.json`` listing them, and one extra unlabeled COCO image."""
    coco = root / "coco"
    written: list[Path] = []
    for split in SPLITS:
        annotations, images = [], []
        numbers = sorted(int(n) for n in rng.choice(np.arange(1, 600000), size=num_images + 1, replace=False))
        for n in numbers[:num_images]:
            stem = f"{n:012d}"
            written += _pair(
                rng,
                coco / f"{split}2017" / f"{stem}.jpg",
                coco / f"panoptic_semseg_{split}2017" / f"{stem}.png",
                np.arange(133),
                255,
            )
            w, h = Image.open(coco / f"{split}2017" / f"{stem}.jpg").size
            images.append({"id": n, "file_name": f"{stem}.jpg", "height": h, "width": w})
            annotations.append({"image_id": n, "file_name": f"{stem}.png", "segments_info": []})
        extra = _random_label(rng, _random_size(rng), np.arange(133), None)  # image of another COCO task
        written.append(
            _save_image(coco / f"{split}2017" / f"{numbers[-1]:012d}.jpg", _random_image(rng, extra))
        )
        json_path = coco / "annotations" / f"panoptic_{split}2017.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
        written.append(json_path)
    return written


WRITERS: dict[str, Writer] = {
    "acdc": write_acdc,
    "muses": write_muses,
    "cityscapes": write_cityscapes,
    "bdd": write_bdd,
    "mapillary": write_mapillary,
    "ade20k": write_ade20k,
    "idd": write_idd,
    "pascal_ctx59": write_pascal_ctx59,
    "nyu": write_nyu,
    "coconut": write_coconut,
}
"""Layout name -> writer ``(root, num_images, rng, **kw) -> written files``."""


OWN_DOMAIN_CLASSES = ("water", "road", "sky")


def write_own_domain(
    root: str | Path,
    *,
    name: str = "floods",
    classes: Sequence[str] = OWN_DOMAIN_CLASSES,
    num_train: int = 6,
    num_val: int = 3,
    seed: int = 0,
) -> Path:
    """A domain of your own, as a user would bring it: images, labels, a class list and a domain spec.

    Writes ``<root>/<name>/{train,val}/images/*.jpg`` and ``.../labels/*.png`` (ids ``0 .. len(classes)-1``
    and 255 = ignore), ``<root>/<name>/classes.json`` and the spec ``<root>/<name>.yaml`` (see
    :mod:`cat_seg.data.domain_spec`). Returns the spec's path.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = np.arange(len(classes))
    for split, count in (("train", num_train), ("val", num_val)):
        for i in range(count):
            folder = root / name / split
            _pair(
                rng,
                folder / "images" / f"{name}_{i:04d}.jpg",
                folder / "labels" / f"{name}_{i:04d}.png",
                ids,
                255,
            )
    (root / name / "classes.json").write_text(json.dumps(list(classes)) + "\n")
    spec = root / f"{name}.yaml"
    spec.write_text(
        f"# A domain of your own (python -m cat_seg.data.synthetic --layout own); paths relative to this file.\n"
        f"name: {name}\n"
        f"classes: {name}/classes.json\n"
        "ignore_label: 255\n"
        "metric: detectron2\n"
        "train:\n"
        f"  images: {name}/train/images\n"
        f"  labels: {name}/train/labels\n"
        "  image_suffix: .jpg\n"
        "  label_suffix: .png\n"
        "val:\n"
        f"  images: {name}/val/images\n"
        f"  labels: {name}/val/labels\n"
        "  image_suffix: .jpg\n"
        "  label_suffix: .png\n"
    )
    return spec


def write_synthetic(
    layout: str, root: str | Path, num_images: int, seed: int, **kwargs: object
) -> list[Path]:
    """Write a tiny dataset of one layout (both splits) under ``root``.

    Args:
        layout: one of ``WRITERS`` (acdc, muses, cityscapes, bdd, mapillary, ade20k, idd, pascal_ctx59,
            nyu, coconut).
        root: dataset root (``$DETECTRON2_DATASETS``-style); created if needed.
        num_images: images per split (and per condition for acdc/muses), >= 1.
        seed: seed of ``numpy.random.default_rng``; the same seed writes the same files.
        **kwargs: layout options (``conditions`` for acdc/muses, ``with_ref`` for acdc, ``official``
            for ade20k).
    Returns:
        every file written, sorted.
    """
    if layout not in WRITERS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(WRITERS)}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = WRITERS[layout](root, num_images, np.random.default_rng(seed), **kwargs)
    logger.info("synthetic %s: %d files under %s", layout, len(files), root)
    return sorted(files)


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m cat_seg.data.synthetic``."""
    parser = argparse.ArgumentParser(description="Write tiny synthetic datasets in the real on-disk layouts.")
    parser.add_argument(
        "--layout",
        required=True,
        choices=[*WRITERS, "all", "own"],
        help="layout to write, all of them, or own: a domain of your own with its spec (docs/own_domain.md; "
        "2 x --num-images train and --num-images val images, classes water, road, sky)",
    )
    parser.add_argument("--root", required=True, type=Path, help="dataset root to write into")
    parser.add_argument(
        "--num-images", type=int, default=3, help="images per split and per condition (default: 3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--conditions",
        nargs="+",
        default=None,
        help="acdc conditions (fog night rain snow) and/or muses <weather>-<time> (clear-day ...); default all",
    )
    parser.add_argument("--name", default="floods", help="domain name of --layout own (default: floods)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write the requested layouts; returns the exit status (1 with a one-line message on an error)."""
    from ..cli import add_debug_flag, report_errors

    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return report_errors("cat_seg.data.synthetic", lambda: _write(args), debug=args.debug)


def _write(args: argparse.Namespace) -> int:
    if args.layout == "own":
        if args.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
        spec = write_own_domain(
            args.root, name=args.name, num_train=2 * args.num_images, num_val=args.num_images, seed=args.seed
        )
        print(f"own domain {args.name!r}: spec {spec}")
        return 0
    layouts = list(WRITERS) if args.layout == "all" else [args.layout]
    conditions = args.conditions or []
    acdc = [c for c in conditions if c in ACDC_CONDITIONS]
    muses = [c for c in conditions if "-" in c]
    unknown = sorted(set(conditions) - set(acdc) - set(muses))
    if unknown:
        print(f"cat_seg.data.synthetic: error: unknown condition(s) {unknown}", file=sys.stderr)
        return 2
    total = 0
    for layout in layouts:
        kwargs: dict[str, object] = {}
        if layout == "acdc" and conditions:
            if not acdc:
                continue
            kwargs["conditions"] = acdc
        if layout == "muses" and conditions:
            if not muses:
                continue
            kwargs["conditions"] = muses
        files = write_synthetic(layout, args.root, args.num_images, args.seed, **kwargs)
        total += len(files)
        print(f"{layout}: wrote {len(files)} files")
    print(f"{total} files under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
