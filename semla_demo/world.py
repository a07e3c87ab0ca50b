"""The demo's world: procedural street scenes under eight weather x time-of-day conditions, written in
the MUSES on-disk layout so that the registered ``muses-<weather>-<time>_sem_seg_{train,val}`` datasets
read it unchanged.

Each image is a different scene (train and val scenes are disjoint). The scene (geometry, labels,
depth, clear-day colours) comes from :mod:`semla_demo.scene`, the condition from
:mod:`semla_demo.weather`. Every image is a function of ``(seed, condition, split, index)`` alone, so a
world written with fewer images is a prefix of a larger one, and the same seed gives the same bytes.

Command line::

    python -m semla_demo.world --root DIR [--train 200 --val 60 --size 64 --seed 0]
    python -m semla_demo.world --preview world.png [--seed 0]      # 3 scenes x 8 conditions + label + depth
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time as _time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .canvas import BUILDING, CAR, CLASS_NAMES, IGNORE, PERSON, ROAD, SIDEWALK, SKY, VEGETATION
from .scene import Scene, generate_scene
from .weather import TIMES, WEATHERS, render

__all__ = [
    "CONDITIONS",
    "LABELLED_CLASSES",
    "TIMES",
    "WEATHERS",
    "Example",
    "Scene",
    "caption",
    "generate_scene",
    "ground_truth",
    "make_example",
    "main",
    "preview",
    "render",
    "write_world",
]

logger = logging.getLogger(__name__)

#: The eight MUSES conditions, (weather, time).
CONDITIONS: tuple[tuple[str, str], ...] = tuple((w, t) for w in WEATHERS for t in TIMES)
SPLITS = ("train", "val")
MANIFEST = "semla_demo_world.json"  # written at the root, outside the folders the MUSES scanner reads

_EGO_VEHICLE_LABEL_ID = 1  # Cityscapes labelId of the ego vehicle (trainId 255)
_UNLABELED_LABEL_ID = 0  # Cityscapes labelId "unlabeled" (trainId 255): the world's void classes
#: The classes the world's ground truth labels: road, sidewalk, building, vegetation, sky and car. The scenes
#: also draw poles, signs, traffic lights, people, two-wheelers, buses, walls, fences and grass verges, but
#: at 64 px each covers a few pixels (together about 4 % of the pixels): they are void (255) in the written
#: label maps, as Cityscapes voids its rare classes, so that the demo's IoU averages classes a model with
#: an 8 x 8 token grid can see. Captions still name everything in view.
LABELLED_CLASSES: tuple[int, ...] = (ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR)
_MIN_CAPTION_PIXELS = 3  # a class is named in a caption when it covers at least this many pixels


def condition_name(weather: str, time: str) -> str:
    """``"fog-night"``: the MUSES domain suffix (dataset ``muses-fog-night_sem_seg_val``)."""
    return f"{weather}-{time}"


def _check_condition(weather: str, time: str) -> int:
    """Index of (weather, time) in ``CONDITIONS``; raises ValueError for an unknown one."""
    try:
        return CONDITIONS.index((weather, time))
    except ValueError:
        raise ValueError(
            f"unknown condition {weather!r}-{time!r}; expected <weather>-<time> with weather in {WEATHERS} "
            f"and time in {TIMES}"
        ) from None


def parse_condition(text: str) -> tuple[str, str]:
    """``"fog-night"`` -> ``("fog", "night")`` (validated)."""
    weather, _, time = text.partition("-")
    _check_condition(weather, time)
    return weather, time


# ----------------------------------------------------------------------------------------------------
# captions


_COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
_PLURALS = {"person": "people", "bus": "buses", "vegetation": "trees", "terrain": "grass"}
_MASS_NOUNS = {
    "road": ("road",),
    "sidewalk": ("sidewalk", "a sidewalk"),
    "building": ("buildings",),
    "wall": ("a wall",),
    "fence": ("a fence",),
    "vegetation": ("vegetation",),
    "terrain": ("terrain", "grass"),
    "sky": ("sky",),
}
_WEATHER_WORDS = {
    "clear": (("clear", "dry"), ("in clear weather", "under a clear sky")),
    "fog": (("foggy", "misty", "hazy"), ("in fog", "in thick fog", "in the mist")),
    "rain": (("rainy", "wet"), ("in the rain", "in heavy rain")),
    "snow": (("snowy", "snow-covered"), ("in the snow", "in snowfall")),
}
_TIME_WORDS = {
    "day": (("day", "daytime"), ("during the day", "by day", "in daylight")),
    "night": (("night", "nighttime"), ("at night", "after dark")),
}
_TEMPLATES = (
    "a {adj} {noun} street with {objects}",
    "a city street {wphrase} {tphrase}, with {objects}",
    "{objects} on a {adj} street {tphrase}",
    "a photo of a {adj} road {tphrase} showing {objects}",
)


def _join(items: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _object_phrase(name: str, count: int, rng: np.random.Generator) -> str:
    """``"a car"``, ``"three cars"``, ``"many people"``, or a mass noun (``"road"``) when count is 0."""
    if count == 0:
        options = _MASS_NOUNS.get(name, (name,))
        return options[int(rng.integers(len(options)))]
    if count == 1:
        return f"a {name}"
    plural = _PLURALS.get(name, name + "s")
    return f"{_COUNT_WORDS.get(count, 'many')} {plural}"


def caption(scene: Scene, weather: str, time: str, rng: np.random.Generator) -> str:
    """A sentence naming the weather, the time of day and every class visible in the scene.

    Classes use the Cityscapes names of ``cs19.json`` (the words the segmenter's prompts use), with counts
    of the visible objects ("two cars", "a person"); a tree counts as vegetation ("a vegetation" is
    written "vegetation", several as "trees"). The wording (template, synonyms, object order) is drawn
    from ``rng``.

    Example: ``"a foggy night street with road, two cars, a person, buildings and sky"``.
    """
    _check_condition(weather, time)
    ids, pixels = np.unique(scene.label[scene.label != IGNORE], return_counts=True)
    counts = scene.object_counts()
    phrases = []
    for cls, n in zip(ids.tolist(), pixels.tolist()):
        if n < _MIN_CAPTION_PIXELS:
            continue
        name = CLASS_NAMES[cls]
        count = counts.get(cls, 0)
        if cls == PERSON and count == 1:
            phrases.append("a person")
        elif name == "vegetation" and count == 1:
            phrases.append("a tree" if rng.random() < 0.5 else "vegetation")
        else:
            phrases.append(_object_phrase(name, count, rng))
    phrases = [phrases[i] for i in rng.permutation(len(phrases))] or ["nothing"]
    adjectives, wphrases = _WEATHER_WORDS[weather]
    nouns, tphrases = _TIME_WORDS[time]
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return template.format(
        adj=adjectives[int(rng.integers(len(adjectives)))],
        noun=nouns[int(rng.integers(len(nouns)))],
        wphrase=wphrases[int(rng.integers(len(wphrases)))],
        tphrase=tphrases[int(rng.integers(len(tphrases)))],
        objects=_join(phrases),
    )


# ----------------------------------------------------------------------------------------------------
# examples


@dataclass
class Example:
    """One image of the world.

    Attributes:
        scene: the scene (labels, depth, clear-day rendering, ...).
        image: (H, W, 3) uint8, the scene under the example's condition.
        caption: a sentence describing it (see :func:`caption`).
    """

    scene: Scene
    image: np.ndarray
    caption: str


def example_rngs(
    seed: int, weather: str, time: str, split: str, index: int
) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """The independent generators of one image: (scene, condition rendering, caption).

    Each is seeded from ``(seed, condition index, split index, image index, stream)``, so an image does
    not depend on how many others are written or in which order.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    key = [seed, _check_condition(weather, time), SPLITS.index(split), index]
    return tuple(np.random.default_rng([*key, stream]) for stream in range(3))  # type: ignore[return-value]


def make_example(
    seed: int, weather: str, time: str, split: str, index: int, size: tuple[int, int] = (64, 64)
) -> Example:
    """Regenerate image ``index`` of ``split`` for one condition, exactly as :func:`write_world` writes it."""
    scene_rng, render_rng, caption_rng = example_rngs(seed, weather, time, split, index)
    scene = generate_scene(scene_rng, size)
    return Example(
        scene, render(scene, weather, time, render_rng), caption(scene, weather, time, caption_rng)
    )


def stem(weather: str, time: str, split: str, index: int) -> str:
    """MUSES-like file stem, unique over the world: ``REC<cc><ss>_frame_<index>``."""
    return f"REC{_check_condition(weather, time):02d}{SPLITS.index(split):02d}_frame_{index:06d}"


def image_dir(root: Path, split: str, weather: str, time: str) -> Path:
    """``<root>/muses/frame_camera/<split>/<weather>/<time>``."""
    return Path(root) / "muses" / "frame_camera" / split / weather / time


def label_dir(root: Path, split: str, weather: str, time: str) -> Path:
    """``<root>/muses/gt_semantic/<split>/<weather>/<time>``."""
    return Path(root) / "muses" / "gt_semantic" / split / weather / time


# ----------------------------------------------------------------------------------------------------
# writing


def _write_png(path: Path, array: np.ndarray, compress_level: int = 6) -> None:
    """Lossless, deterministic PNG: RGB for (H, W, 3), 8-bit grey ("L", as ``cat_seg.data.io.write_label``
    writes label maps) for (H, W) uint8."""
    Image.fromarray(array).save(path, compress_level=compress_level)


def ground_truth(label: np.ndarray) -> np.ndarray:
    """A scene's label map as the world writes it: classes outside ``LABELLED_CLASSES`` become 255."""
    return np.where(np.isin(label, LABELLED_CLASSES), label, IGNORE).astype(np.uint8)


def _label_id_table() -> np.ndarray:
    """(256,) uint8: trainId -> Cityscapes labelId (from the project's table) for the labelled classes,
    "unlabeled" for the void ones, 255 -> ego vehicle."""
    from cat_seg.data import train_ids_to_label_ids

    table = train_ids_to_label_ids(np.arange(256)).astype(np.uint8)
    void = np.setdiff1d(np.arange(len(CLASS_NAMES)), LABELLED_CLASSES)
    table[void] = _UNLABELED_LABEL_ID
    table[IGNORE] = _EGO_VEHICLE_LABEL_ID
    return table


def _write_images(
    root: Path,
    seed: int,
    weather: str,
    time: str,
    split: str,
    indices: range,
    size: tuple[int, int],
    label_ids: np.ndarray,
) -> list[dict[str, Any]]:
    """Write images ``indices`` (+ trainIds and labelIds maps) of one condition and split; returns their
    manifest entries. Runs in worker processes: imports nothing beyond numpy, PIL and this package."""
    images, labels = image_dir(root, split, weather, time), label_dir(root, split, weather, time)
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in indices:
        ex = make_example(seed, weather, time, split, index, size)
        name = stem(weather, time, split, index)
        _write_png(images / f"{name}_frame_camera.png", ex.image, compress_level=1)
        label = ground_truth(ex.scene.label)
        _write_png(labels / f"{name}_gt_labelTrainIds.png", label)
        _write_png(labels / f"{name}_gt_labelIds.png", label_ids[label])
        entries.append(
            {
                "image": f"muses/frame_camera/{split}/{weather}/{time}/{name}_frame_camera.png",
                "label": f"muses/gt_semantic/{split}/{weather}/{time}/{name}_gt_labelTrainIds.png",
                "weather": weather,
                "time": time,
                "split": split,
                "index": index,
                "seed": seed,
                "caption": ex.caption,
                "classes": np.unique(label[label != IGNORE]).tolist(),
            }
        )
    return entries


def _update_manifest(root: Path, conditions: list[tuple[str, str]], entries: list[dict[str, Any]]) -> None:
    """Write ``<root>/semla_demo_world.json``: these entries plus the earlier entries of conditions not
    rewritten now (their files are still on disk), sorted by condition, split and index."""
    path = root / MANIFEST
    kept = []
    if path.is_file():
        try:
            kept = json.loads(path.read_text())["entries"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a world manifest ({e}); remove it to start afresh") from e
        kept = [e for e in kept if (e["weather"], e["time"]) not in set(conditions)]
    order = {c: i for i, c in enumerate(CONDITIONS)}
    merged = sorted(
        kept + entries, key=lambda e: (order[e["weather"], e["time"]], SPLITS.index(e["split"]), e["index"])
    )
    present = sorted({(e["weather"], e["time"]) for e in merged}, key=order.__getitem__)
    counts: dict[str, dict[str, int]] = {condition_name(w, t): {"train": 0, "val": 0} for w, t in present}
    for e in merged:
        counts[condition_name(e["weather"], e["time"])][e["split"]] += 1
    manifest = {"conditions": list(counts), "counts": counts, "entries": merged}
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _job(args: tuple) -> list[dict[str, Any]]:
    return _write_images(*args)


_CHUNK = 40  # images per job: small enough to balance two workers, large enough to amortise the hand-off


def write_world(
    root: str | Path,
    *,
    train_per_condition: int,
    val_per_condition: int,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    conditions: Sequence[tuple[str, str]] = CONDITIONS,
    overwrite: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Write the world in the MUSES layout under ``root``, plus a manifest with every image's caption.

    Files: ``muses/frame_camera/<split>/<weather>/<time>/<stem>_frame_camera.png`` (RGB),
    ``muses/gt_semantic/<split>/<weather>/<time>/<stem>_gt_labelTrainIds.png`` (train ids, 255 = ego
    vehicle) and ``..._gt_labelIds.png`` (Cityscapes labelIds), and the manifest
    ``<root>/semla_demo_world.json`` (every image's paths, condition, split, index, seed, caption and
    classes; entries of conditions written by earlier calls are kept).

    Args:
        root: dataset root (what ``--root`` / ``$DETECTRON2_DATASETS`` would be).
        train_per_condition: images per condition in ``train``.
        val_per_condition: images per condition in ``val``.
        size: (height, width) of every image.
        seed: world seed (>= 0); the same seed writes the same bytes.
        conditions: (weather, time) pairs to write.
        overwrite: replace the image and label folders of the written conditions if they already hold
            files; otherwise such folders are an error (stale files would join the datasets).
        workers: processes writing in parallel; the output does not depend on it. More than one
            starts fresh ("spawn") processes, which import the caller's main module again: call from
            under ``if __name__ == "__main__":`` (the command line uses up to 2, one per CPU core).
    Returns:
        Summary: ``root``, ``seed``, ``size``, ``conditions`` (names), ``counts``
        (``{"fog-night": {"train": n, "val": m}}``), ``images`` (total) and ``manifest`` (path).
    """
    root = Path(root)
    size = (int(size[0]), int(size[1]))
    if train_per_condition < 0 or val_per_condition < 0:
        raise ValueError(f"image counts must be >= 0, got {train_per_condition}, {val_per_condition}")
    conditions = [tuple(c) for c in conditions]
    for weather, time in conditions:
        _check_condition(weather, time)
    if len(set(conditions)) != len(conditions):
        raise ValueError(f"conditions listed twice: {conditions}")
    counts = {"train": train_per_condition, "val": val_per_condition}
    folders = [
        f(root, split, w, t) for (w, t) in conditions for split in SPLITS for f in (image_dir, label_dir)
    ]
    occupied = [d for d in folders if d.is_dir() and any(d.iterdir())]
    if occupied and not overwrite:
        raise FileExistsError(
            f"{occupied[0]} already holds files ({len(occupied)} folder(s) in all); pass overwrite=True "
            "(--overwrite) to replace the written conditions"
        )
    for d in occupied:
        shutil.rmtree(d)
    table = _label_id_table()
    jobs = [
        (root, seed, w, t, split, range(i, min(i + _CHUNK, counts[split])), size, table)
        for (w, t) in conditions
        for split in SPLITS
        for i in range(0, counts[split], _CHUNK)
    ]
    start = _time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold threads (torch), which fork does not copy safely
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = list(pool.map(_job, jobs))
    else:
        results = [_job(j) for j in jobs]
    entries = [e for r in results for e in r]
    names = [condition_name(w, t) for (w, t) in conditions]
    summary: dict[str, Any] = {
        "root": str(root),
        "seed": seed,
        "size": list(size),
        "conditions": names,
        "counts": {n: dict(counts) for n in names},
        "images": len(entries),
        "manifest": str(root / MANIFEST),
    }
    _update_manifest(root, conditions, entries)
    logger.info("wrote %d images to %s in %.1f s", len(entries), root, _time.perf_counter() - start)
    return summary


# ----------------------------------------------------------------------------------------------------
# preview


def colourise_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8: log distance from 1 m (white) to the sky (black)."""
    from .scene import SKY_DEPTH

    t = np.clip(np.log(np.maximum(depth, 1.0)) / np.log(SKY_DEPTH), 0, 1)
    return np.repeat(np.round(255 * (1 - t))[..., None], 3, axis=-1).astype(np.uint8)


def preview(
    *, seed: int = 0, size: tuple[int, int] = (64, 64), num_scenes: int = 3, scale: int = 4
) -> np.ndarray:
    """A picture of the world: rows = scenes, columns = the 8 conditions, the label and the depth.

    The same scene is shown under every condition (unlike the written world, where each image is a new
    scene), so the conditions can be compared. Upscaled ``scale`` times (nearest neighbour).

    Returns:
        (rows, cols, 3) uint8 image with a header row naming the columns.
    """
    from .visualize import cityscapes_palette

    palette = cityscapes_palette()
    h, w = size
    gap = 2
    titles = [condition_name(wt, t) for (wt, t) in CONDITIONS] + ["label", "depth"]
    tiles = []
    for i in range(num_scenes):
        scene = generate_scene(np.random.default_rng([seed, 99, i]), size)
        row = [
            render(scene, wt, t, np.random.default_rng([seed, 99, i, c]))
            for c, (wt, t) in enumerate(CONDITIONS)
        ]
        row += [palette[ground_truth(scene.label)], colourise_depth(scene.depth)]
        tiles.append(row)
    tile_h, tile_w = h * scale, w * scale
    header = 14
    canvas = np.full(
        (header + num_scenes * (tile_h + gap), len(titles) * (tile_w + gap), 3), 255, dtype=np.uint8
    )
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            big = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
            y, x = header + r * (tile_h + gap), c * (tile_w + gap)
            canvas[y : y + tile_h, x : x + tile_w] = big
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for c, title in enumerate(titles):
        draw.text((c * (tile_w + gap) + 3, 2), title, fill=(0, 0, 0))
    return np.asarray(picture)


# ----------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m semla_demo.world",
        description="Write the demo's procedural street world (8 weather x time conditions) in the MUSES layout.",
    )
    parser.add_argument("--root", type=Path, help="dataset root to write into (muses/... and the manifest)")
    parser.add_argument("--train", type=int, default=200, help="training images per condition (default 200)")
    parser.add_argument("--val", type=int, default=60, help="validation images per condition (default 60)")
    parser.add_argument(
        "--size", type=int, nargs="+", default=[64], help="image size: S (square) or H W (default 64)"
    )
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument(
        "--conditions",
        nargs="+",
        default=None,
        metavar="WEATHER-TIME",
        help="conditions to write, e.g. clear-day fog-night (default: all 8)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing folders of these conditions"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="writing processes (default: up to 2, one per CPU core)"
    )
    parser.add_argument("--preview", type=Path, help="also write a preview picture (PNG) to this file")
    parser.add_argument(
        "--preview-scenes", type=int, default=3, help="scenes (rows) in the preview (default 3)"
    )
    parser.add_argument("--scale", type=int, default=4, help="preview upscaling factor (default 4)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write a world and/or a preview; prints a one-line summary. Returns the exit status."""
    from cat_seg.cli import add_debug_flag, report_errors

    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.root is None and args.preview is None:
        parser.error("give --root DIR (write a world) and/or --preview FILE.png")
    if len(args.size) not in (1, 2):
        parser.error("--size takes one or two integers")
    size = (args.size[0], args.size[-1])

    def body() -> int:
        logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING)
        if args.root is not None:
            conditions = (
                CONDITIONS if args.conditions is None else [parse_condition(c) for c in args.conditions]
            )
            start = _time.perf_counter()
            summary = write_world(
                args.root,
                train_per_condition=args.train,
                val_per_condition=args.val,
                size=size,
                seed=args.seed,
                conditions=conditions,
                overwrite=args.overwrite,
                workers=min(2, os.cpu_count() or 1) if args.workers is None else args.workers,
            )
            print(
                f"wrote {summary['images']} images ({len(conditions)} conditions x ({args.train} train + "
                f"{args.val} val), {size[0]}x{size[1]}, seed {args.seed}) to {args.root} in "
                f"{_time.perf_counter() - start:.1f} s"
            )
        if args.preview is not None:
            picture = preview(seed=args.seed, size=size, num_scenes=args.preview_scenes, scale=args.scale)
            args.preview.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(args.preview)
            print(f"wrote preview {args.preview} ({picture.shape[1]}x{picture.shape[0]})")
        return 0

    return report_errors("semla_demo.world", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
