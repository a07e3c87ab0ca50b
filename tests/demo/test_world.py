"""The demo's world: scenes, the eight conditions' physical effects, captions and the MUSES-layout writer.

Each condition is compared with the clear rendering of the *same* scenes and must differ in the way it is
named: fog lowers contrast more with distance and pulls far pixels to the airlight, night is dark but has
bright light sources and noise, rain lowers contrast, adds thin bright streaks and darkens the road,
snow whitens the ground and adds small bright flakes; combined conditions show both effects.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cat_seg.data import label_ids_to_train_ids, load_records, read_image, read_label
from cat_seg.data import validate as validate_cli
from cat_seg.data.layouts import MUSES_TIMES, MUSES_WEATHERS
from semla_demo import world
from semla_demo.canvas import IGNORE, NUM_CLASSES, ROAD, SIDEWALK, SKY_DEPTH, TERRAIN
from semla_demo.world import CONDITIONS, caption, generate_scene, make_example, render, write_world

N_SCENES = 12


@pytest.fixture(scope="module")
def scenes() -> list:
    return [generate_scene(np.random.default_rng([11, i])) for i in range(N_SCENES)]


@pytest.fixture(scope="module")
def images(scenes: list) -> dict[tuple[str, str], list[np.ndarray]]:
    """Every scene under every condition, as float (H, W, 3) arrays."""
    return {
        cond: [
            render(s, *cond, np.random.default_rng([12, i, k])).astype(np.float64)
            for i, s in enumerate(scenes)
        ]
        for k, cond in enumerate(CONDITIONS)
    }


def grey(image: np.ndarray) -> np.ndarray:
    return image.mean(axis=-1)


def streak_pixels(image: np.ndarray, step: float = 6.0) -> int:
    """Pixels of thin bright near-vertical lines: brighter than both horizontal neighbours by ``step``
    grey levels, three rows in a row."""
    g = grey(image)
    padded = np.pad(g, ((0, 0), (1, 1)), mode="edge")
    ridge = g - np.maximum(padded[:, :-2], padded[:, 2:]) > step
    return int((ridge[:-2] & ridge[1:-1] & ridge[2:]).sum())


def bright_blobs(image: np.ndarray, step: float = 12.0) -> int:
    """Small bright spots: pixels brighter than all 8 neighbours by ``step`` grey levels."""
    g = grey(image)
    padded = np.pad(g, 1, mode="edge")
    h, w = g.shape
    neighbours = [
        padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
    ]
    return int((g - np.max(neighbours, axis=0) >= step).sum())


def mean_saturation(pixels: np.ndarray) -> float:
    """Mean HSV saturation of (N, 3) pixels: 0 for grey and white."""
    return float(((pixels.max(-1) - pixels.min(-1)) / np.maximum(pixels.max(-1), 1)).mean())


def sky_noise(image: np.ndarray, scene) -> float:
    """Mean absolute difference of horizontally adjacent sky pixels, relative to the sky's brightness."""
    g, sky = grey(image), scene.sky
    pairs = sky[:, 1:] & sky[:, :-1]
    return float(np.abs(np.diff(g, axis=1))[pairs].mean() / max(g[sky].mean(), 1.0))


def far_near_contrast(images, reference, scenes) -> tuple[float, float, float]:
    """Mean over scenes of: std ratio (condition / reference) of far (> 40 m) and of near (< 10 m)
    surface pixels, and how much closer far pixels are to the airlight (the condition's sky colour)."""
    far_ratio, near_ratio, airlight_ratio = [], [], []
    for image, ref, s in zip(images, reference, scenes):
        surface = ~s.sky & (s.label != IGNORE)
        far, near = surface & (s.depth > 40), surface & (s.depth < 10)
        if far.sum() < 10 or near.sum() < 10:
            continue
        far_ratio.append(grey(image)[far].std() / grey(ref)[far].std())
        near_ratio.append(grey(image)[near].std() / grey(ref)[near].std())
        airlight = image[s.sky].mean(axis=0)
        airlight_ratio.append(np.abs(image[far] - airlight).mean() / np.abs(ref[far] - airlight).mean())
    assert len(far_ratio) >= N_SCENES // 2
    return float(np.mean(far_ratio)), float(np.mean(near_ratio)), float(np.mean(airlight_ratio))


# ----------------------------------------------------------------------------------------------------
# scenes


def test_conditions_are_the_registered_muses_domains() -> None:
    assert set(CONDITIONS) == {(w, t) for w in MUSES_WEATHERS for t in MUSES_TIMES}
    assert len(CONDITIONS) == 8
    assert world.WEATHERS == ("clear", "fog", "rain", "snow") and world.TIMES == ("day", "night")


def test_scene_labels_depth_and_maps(scenes: list) -> None:
    n_classes = []
    for s in scenes:
        h, w = s.size
        assert s.image.shape == (h, w, 3) and s.image.dtype == np.uint8
        assert s.label.shape == (h, w) and s.label.dtype == np.uint8
        values = set(np.unique(s.label).tolist())
        assert values <= set(range(NUM_CLASSES)) | {IGNORE}
        n_classes.append(len(values - {IGNORE}))
        assert s.depth.dtype == np.float32 and (s.depth > 0).all()
        # far = horizon: the sky is the farthest, and ground rows get nearer towards the bottom
        assert s.sky.any() and (s.depth[s.sky] == SKY_DEPTH).all() and s.depth[~s.sky].max() < SKY_DEPTH
        ground = np.isin(s.label, (ROAD, SIDEWALK, TERRAIN)) & (s.up == 1)
        rows = [r for r in range(h) if ground[r].sum() >= 3]
        forward = np.array([np.median(s.points[r, :, 2][ground[r]]) for r in rows])  # z of each ground row
        assert (np.diff(forward) < 0).all()
        assert s.depth[: int(s.camera.horizon)].mean() > s.depth[int(s.camera.horizon) + 2 :].mean()
        assert ((s.up >= 0) & (s.up <= 1)).all() and (s.emission >= 0).all()
        assert s.points.shape == (h, w, 3) and np.allclose(s.points[..., 1][ground], 0, atol=1e-3)
    assert np.mean(n_classes) >= 8  # road, sidewalk, building, vegetation, sky, pole, car, ... on average
    seen = set().union(*(np.unique(s.label).tolist() for s in scenes))
    assert {0, 1, 2, 5, 8, 10, 13} <= seen


def test_same_rng_same_scene_and_image_different_rng_different() -> None:
    a, b = generate_scene(np.random.default_rng(5)), generate_scene(np.random.default_rng(5))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.depth, b.depth)
    ra = render(a, "fog", "night", np.random.default_rng(1))
    assert np.array_equal(ra, render(b, "fog", "night", np.random.default_rng(1)))
    assert not np.array_equal(ra, render(b, "fog", "night", np.random.default_rng(2)))
    assert not np.array_equal(a.label, generate_scene(np.random.default_rng(6)).label)
    tall = generate_scene(np.random.default_rng(5), (48, 80))
    assert tall.image.shape == (48, 80, 3) and tall.depth.shape == (48, 80)


def test_rendering_never_changes_the_scene(scenes: list) -> None:
    s = scenes[0]
    before = {k: getattr(s, k).copy() for k in ("image", "label", "depth", "points", "up", "emission")}
    for k, cond in enumerate(CONDITIONS):
        out = render(s, *cond, np.random.default_rng(k))
        assert out.shape == s.image.shape and out.dtype == np.uint8
    for key, value in before.items():
        assert np.array_equal(getattr(s, key), value), key
    with pytest.raises(ValueError, match="condition"):
        render(s, "hail", "day", np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------------
# conditions


def test_fog_lowers_contrast_with_depth_and_pulls_far_pixels_to_the_airlight(scenes, images) -> None:
    far, near, airlight = far_near_contrast(images["fog", "day"], images["clear", "day"], scenes)
    assert far < 0.4 and near > 0.5 and far < near - 0.3  # Koschmieder: t = exp(-beta d)
    assert airlight < 0.3
    # the loss of contrast grows with distance: |I - A| shrinks bin by bin
    for image, ref, s in zip(images["fog", "day"], images["clear", "day"], scenes):
        a = image[s.sky].mean(axis=0)
        ratios = []
        for lo, hi in ((0, 8), (15, 30), (50, 200)):
            band = ~s.sky & (s.label != IGNORE) & (s.depth >= lo) & (s.depth < hi)
            if band.sum() >= 10:
                ratios.append(np.abs(image[band] - a).mean() / np.abs(ref[band] - a).mean())
        assert all(x > y for x, y in zip(ratios, ratios[1:])), ratios


def test_night_is_dark_with_light_sources_and_noise(scenes, images) -> None:
    day, night = images["clear", "day"], images["clear", "night"]
    brightness = np.array([grey(n).mean() / grey(d).mean() for n, d in zip(night, day)])
    assert brightness.mean() < 0.55 and brightness.max() < 0.8
    # light sources: the brightest pixels stand far above the dark mean
    peak = np.array([np.percentile(grey(n), 99.5) / grey(n).mean() for n in night])
    assert peak.mean() > 3.0 and (peak > 2.0).mean() >= 0.9
    assert np.mean([n.max() >= 240 for n in night]) >= 0.75
    # sensor noise: relatively much stronger in the dark sky than by day
    assert np.mean([sky_noise(n, s) for n, s in zip(night, scenes)]) > 2.5 * np.mean(
        [sky_noise(d, s) for d, s in zip(day, scenes)]
    )


def test_rain_lowers_contrast_adds_streaks_and_darkens_the_road(scenes, images) -> None:
    clear, rain = images["clear", "day"], images["rain", "day"]
    # contrast loss: the image as a whole, and much more beyond 20 m (the haze of the rain)
    assert np.mean([grey(r).std() / grey(c).std() for r, c in zip(rain, clear)]) < 0.95
    far = [~s.sky & (s.depth > 20) & (s.label != IGNORE) for s in scenes]
    assert np.mean([grey(r)[m].std() / grey(c)[m].std() for r, c, m in zip(rain, clear, far)]) < 0.7
    streaks = np.array([streak_pixels(r) - streak_pixels(c) for r, c in zip(rain, clear)])
    assert (streaks > 0).mean() >= 0.75 and streaks.mean() > 30
    # wet asphalt is darker (compared where the clear day's sun lit the road: rain clouds remove shadows)
    road, rest = [], []
    for r, c, s in zip(rain, clear, scenes):
        near_road = (s.label == ROAD) & (s.depth < 10) & (s.sunlight == 1).all(axis=-1)
        other = ~s.sky & (s.label != ROAD) & (s.label != IGNORE)
        if near_road.sum() >= 5:
            road.append(np.median(grey(r)[near_road]) / np.median(grey(c)[near_road]))
            rest.append(np.median(grey(r)[other]) / np.median(grey(c)[other]))
    assert len(road) >= N_SCENES // 2
    assert np.mean(road) < 0.9 and np.mean(road) < np.mean(rest) - 0.15


def test_snow_whitens_horizontal_surfaces_and_adds_flakes(scenes, images) -> None:
    clear, snow = images["clear", "day"], images["snow", "day"]
    gain, saturation = [], []
    for sn, c, s in zip(snow, clear, scenes):
        flat = np.isin(s.label, (SIDEWALK, TERRAIN)) & (s.up == 1)
        if flat.sum() < 5:
            continue
        gain.append(grey(sn)[flat].mean() / grey(c)[flat].mean())
        saturation.append((mean_saturation(sn[flat]), mean_saturation(c[flat])))
    assert np.mean(gain) > 1.3
    assert np.mean([a < b for a, b in saturation]) >= 0.8  # whiter: less saturated
    assert np.mean([a for a, _ in saturation]) < 0.5 * np.mean([b for _, b in saturation])
    blobs = np.array([bright_blobs(sn) - bright_blobs(c) for sn, c in zip(snow, clear)])
    assert (blobs > 0).mean() >= 0.75 and blobs.mean() > 5


def test_combined_conditions_show_both_effects(scenes, images) -> None:
    for weather in ("fog", "rain", "snow"):  # the night effect on top of each weather
        ratio = [
            grey(n).mean() / grey(d).mean() for n, d in zip(images[weather, "night"], images[weather, "day"])
        ]
        assert np.mean(ratio) < 0.6, weather
        assert np.mean([sky_noise(n, s) for n, s in zip(images[weather, "night"], scenes)]) > 0.04
    # fog at night: the far scene still loses its contrast and approaches the (dim) airlight
    far, near, airlight = far_near_contrast(images["fog", "night"], images["clear", "night"], scenes)
    assert far < 0.6 and far < near - 0.2 and airlight < 0.6
    # rain at night: streaks lit by the lamps
    streaks = [
        streak_pixels(r) - streak_pixels(c) for r, c in zip(images["rain", "night"], images["clear", "night"])
    ]
    assert np.mean(streaks) > 40
    # snow at night: flakes, and snow-covered ground brighter than on a clear night
    blobs = [
        bright_blobs(s) - bright_blobs(c) for s, c in zip(images["snow", "night"], images["clear", "night"])
    ]
    assert np.mean(blobs) > 5
    gain = []
    for sn, c, s in zip(images["snow", "night"], images["clear", "night"], scenes):
        flat = np.isin(s.label, (SIDEWALK, TERRAIN)) & (s.up == 1)
        if flat.sum() >= 5:
            gain.append(grey(sn)[flat].mean() / max(grey(c)[flat].mean(), 1.0))
    assert np.mean(gain) > 1.3


# ----------------------------------------------------------------------------------------------------
# captions


def test_caption_names_weather_time_and_visible_classes(scenes) -> None:
    words = {
        "clear": ("clear", "dry"),
        "fog": ("fog", "misty", "mist", "hazy"),
        "rain": ("rain", "wet"),
        "snow": ("snow",),
        "day": ("day",),
        "night": ("night", "dark"),
    }
    names = {
        0: "road",
        2: "building",
        10: "sky",
        13: "car",
        11: ("person", "people"),
        8: ("vegetation", "tree"),
    }
    for i, s in enumerate(scenes):
        for k, (weather, time) in enumerate(CONDITIONS):
            text = caption(s, weather, time, np.random.default_rng([i, k]))
            assert any(w in text for w in words[weather]) and any(w in text for w in words[time]), text
            present = {int(c) for c, n in zip(*np.unique(s.label, return_counts=True)) if n >= 3}
            for cls, name in names.items():
                if cls in present:
                    assert any(n in text for n in ((name,) if isinstance(name, str) else name)), (cls, text)
            assert text == caption(s, weather, time, np.random.default_rng([i, k]))
    texts = {caption(scenes[0], "fog", "night", np.random.default_rng(r)) for r in range(20)}
    assert len(texts) > 3  # the wording varies


# ----------------------------------------------------------------------------------------------------
# the world on disk


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("world")
    return root, write_world(root, train_per_condition=3, val_per_condition=2, seed=4, workers=1)


def test_registered_muses_datasets_read_the_world_and_validate_passes(small_world) -> None:
    root, summary = small_world
    assert summary["images"] == 8 * 5
    for weather, time in CONDITIONS:
        for split, n in (("train", 3), ("val", 2)):
            records = load_records(f"muses-{weather}-{time}_sem_seg_{split}", root)
            assert len(records) == n
            image = read_image(records[0]["file_name"])
            label = read_label(records[0]["sem_seg_file_name"])
            assert image.shape == (64, 64, 3) and label.shape == (64, 64)
            assert set(np.unique(label).tolist()) <= set(range(19)) | {255}
            label_ids = read_label(records[0]["label_ids_file_name"])
            assert np.array_equal(label_ids_to_train_ids(label_ids), label)
    domains = [f"muses-{w}-{t}" for w, t in CONDITIONS]
    argv = ["--root", str(root), "--domains", *domains, "--splits", "train", "val"]
    assert validate_cli.main(argv) == 0
    manifest = json.loads((root / world.MANIFEST).read_text())
    assert len(manifest["entries"]) == 40 and manifest["counts"]["fog-night"] == {"train": 3, "val": 2}
    entry = manifest["entries"][0]
    assert (root / entry["image"]).is_file() and (root / entry["label"]).is_file() and entry["caption"]
    assert entry["seed"] == 4 and (entry["weather"], entry["time"], entry["split"], entry["index"]) == (
        "clear",
        "day",
        "train",
        0,
    )


def test_train_and_val_scenes_are_different(small_world) -> None:
    root, _ = small_world
    stems = set()
    labels = []
    for split in ("train", "val"):
        for path in sorted((root / "muses" / "gt_semantic" / split).rglob("*_gt_labelTrainIds.png")):
            stems.add(path.name)
            labels.append(np.asarray(Image.open(path)).tobytes())
    assert len(stems) == 40 and len(set(labels)) == 40  # every image is its own scene


def test_same_seed_same_bytes_other_seed_differs(small_world, tmp_path: Path) -> None:
    root, _ = small_world
    again = tmp_path / "again"
    write_world(again, train_per_condition=3, val_per_condition=2, seed=4, workers=1)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(root, again, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors and len(match) == len(files)
    other = tmp_path / "other"
    write_world(
        other, train_per_condition=3, val_per_condition=2, seed=5, workers=1, conditions=[("fog", "day")]
    )
    name = "muses/frame_camera/train/fog/day/REC0200_frame_000000_frame_camera.png"
    assert (other / name).read_bytes() != (root / name).read_bytes()
    # an image depends on (seed, condition, split, index) only: a smaller world is a prefix
    small = tmp_path / "small"
    write_world(
        small, train_per_condition=1, val_per_condition=0, seed=4, workers=1, conditions=[("fog", "day")]
    )
    assert (small / name).read_bytes() == (root / name).read_bytes()
    assert make_example(4, "fog", "day", "train", 0).image.tobytes() == read_image(root / name).tobytes()


def test_existing_folders_need_overwrite(tmp_path: Path) -> None:
    write_world(
        tmp_path, train_per_condition=2, val_per_condition=1, workers=1, conditions=[("snow", "night")]
    )
    with pytest.raises(FileExistsError, match="overwrite"):
        write_world(
            tmp_path, train_per_condition=1, val_per_condition=1, workers=1, conditions=[("snow", "night")]
        )
    write_world(
        tmp_path,
        train_per_condition=1,
        val_per_condition=1,
        workers=1,
        conditions=[("snow", "night")],
        overwrite=True,
    )
    assert len(load_records("muses-snow-night_sem_seg_train", tmp_path)) == 1  # no stale files left
    write_world(tmp_path, train_per_condition=1, val_per_condition=0, workers=1, conditions=[("fog", "day")])
    manifest = json.loads((tmp_path / world.MANIFEST).read_text())  # both conditions' entries, in order
    assert manifest["counts"] == {"fog-day": {"train": 1, "val": 0}, "snow-night": {"train": 1, "val": 1}}
    assert [e["weather"] for e in manifest["entries"]] == ["fog", "snow", "snow"]
    with pytest.raises(ValueError, match="unknown condition"):
        write_world(tmp_path, train_per_condition=1, val_per_condition=1, conditions=[("hail", "day")])


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    kwargs = dict(train_per_condition=41, val_per_condition=0, seed=2, conditions=[("rain", "night")])
    write_world(tmp_path / "one", workers=1, **kwargs)
    write_world(tmp_path / "two", workers=2, **kwargs)  # two chunks of images, one per process
    files = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "one", tmp_path / "two", files, shallow=False)
    assert not mismatch and not errors


def test_cli_writes_a_world_and_a_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, picture = tmp_path / "ds", tmp_path / "preview.png"
    argv = ["--root", str(root), "--train", "2", "--val", "1", "--conditions", "clear-day", "fog-night"]
    assert world.main([*argv, "--workers", "1", "--preview", str(picture), "--preview-scenes", "2"]) == 0
    out = capsys.readouterr().out
    assert "wrote 6 images" in out and "preview" in out
    assert len(load_records("muses-fog-night_sem_seg_train", root)) == 2
    image = np.asarray(Image.open(picture))
    scale, gap, header = 4, 2, 14
    assert image.shape == (header + 2 * (64 * scale + gap), 10 * (64 * scale + gap), 3)
    assert image.std() > 20  # not blank
    assert world.main(["--root", str(root), "--conditions", "hail-day"]) == 1
    assert "unknown condition" in capsys.readouterr().err
