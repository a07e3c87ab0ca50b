"""Test-time augmentation (``cat_seg.test_time_augmentation``) on the tiny model: views, averages, settings.

Expected values are computed by hand in each test: the model's forward on the image and on its mirror
(flipped back), PIL resizes, and the mean of the views' probabilities.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, TINY_CONFIG, build_tiny
from PIL import Image

from cat_seg.config import ConfigError, load_config
from cat_seg.lora import semla_target_modules
from cat_seg.test_time_augmentation import TTASettings, augment_input, predict_with_tta
from domain_orchestrator.fusion import fused_adapters, fused_text_features
from domain_orchestrator.library import AdapterLibrary
from domain_orchestrator.step import segment
from domain_orchestrator.synthetic import linear_shapes, write_random_adapter

SLIDING = ("TEST.SLIDING_WINDOW", "True")
# The tiny configs' test resize: INPUT.MIN_SIZE_TEST 48, INPUT.MAX_SIZE_TEST 96.
TEST_SIZE, TEST_MAX = 48, 96


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny operations; deterministic and quick on a busy machine
    yield
    torch.set_num_threads(old)


def _inputs(sizes: tuple[tuple[int, int], ...] = ((48, 64), (56, 48)), seed: int = 0) -> list[dict]:
    """Test-mapper-like inputs: uint8 images already at the test size, output size = the original's."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        out.append({"image": image, "height": 2 * h, "width": 2 * w, "file_name": f"{h}x{w}.png"})
    return out


def _mirrored(batch: list[dict]) -> list[dict]:
    return [{**x, "image": x["image"].flip(-1)} for x in batch]


@pytest.fixture(scope="module", params=[False, True], ids=["whole-image", "sliding-window"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return build_tiny(seed=0, opts=SLIDING if request.param else ()).eval()


# --------------------------------------------------------------------------------------------------
# (a) one view at the test size = today's prediction, (b) flip = mean of the two forwards by hand
# --------------------------------------------------------------------------------------------------


def test_one_view_at_the_test_size_without_flip_is_the_plain_prediction(model: torch.nn.Module) -> None:
    batch = _inputs()
    tta = TTASettings(min_sizes=(TEST_SIZE,), max_size=TEST_MAX, flip=False)
    with torch.no_grad():
        text = model.text_features()
        plain = model(batch, text_features=text)
        augmented = predict_with_tta(lambda views: model(views, text_features=text), batch, tta)
    assert len(augmented) == len(plain)
    for got, expected in zip(augmented, plain):
        assert torch.equal(got["sem_seg"], expected["sem_seg"])
    # no settings: the callable's own outputs
    with torch.no_grad():
        untouched = predict_with_tta(lambda views: model(views, text_features=text), batch, None)
    assert all(torch.equal(a["sem_seg"], b["sem_seg"]) for a, b in zip(untouched, plain))


def test_flip_is_the_mean_of_the_image_and_its_mirror_flipped_back(model: torch.nn.Module) -> None:
    batch = _inputs()
    tta = TTASettings(min_sizes=(TEST_SIZE,), max_size=TEST_MAX, flip=True)
    with torch.no_grad():
        text = model.text_features()
        direct = model(batch, text_features=text)
        mirrored = model(_mirrored(batch), text_features=text)
        augmented = predict_with_tta(lambda views: model(views, text_features=text), batch, tta)
    for got, p, q, x in zip(augmented, direct, mirrored, batch):
        expected = (p["sem_seg"] + q["sem_seg"].flip(-1)) / 2
        assert got["sem_seg"].shape == (19, x["height"], x["width"])
        assert torch.equal(got["sem_seg"], expected)
        assert not torch.equal(got["sem_seg"], p["sem_seg"])  # the mirror did change something


# --------------------------------------------------------------------------------------------------
# (c) several scales: the views detectron2 makes, and their probabilities averaged
# --------------------------------------------------------------------------------------------------


def test_views_are_detectron2s_resize_shortest_edge_then_flip() -> None:
    x = _inputs(((48, 64),))[0]
    tta = TTASettings(min_sizes=(32, 48, 80), max_size=96, flip=True)
    assert tta.views == ((32, False), (32, True), (48, False), (48, True), (80, False), (80, True))
    hwc = x["image"].permute(1, 2, 0).numpy()
    # 48x64 -> short side 32: 64 * 32 / 48 = 42.67 -> 43; short side 80: 80 x 106.7, capped at 96 -> 72 x 96
    for size, (h, w) in {32: (32, 43), 48: (48, 64), 80: (72, 96)}.items():
        pil = np.asarray(Image.fromarray(hwc).resize((w, h), Image.BILINEAR))
        expected = torch.from_numpy(np.ascontiguousarray(pil.transpose(2, 0, 1)))
        view = augment_input(x, size, tta.max_size, flip=False)
        assert torch.equal(view["image"], expected)
        assert (view["height"], view["width"]) == (96, 128)  # the output size stays the input's
        assert torch.equal(augment_input(x, size, tta.max_size, flip=True)["image"], expected.flip(-1))
    assert augment_input(x, 48, 96, flip=False)["image"] is x["image"]  # already that size: untouched
    # without height/width the output size is the image's own (as detectron2's TTA sets it)
    bare = {"image": x["image"]}
    view = augment_input(bare, 32, 96, flip=False)
    assert (view["height"], view["width"]) == (48, 64) and "height" not in bare


def test_a_scale_set_averages_the_views_probabilities(model: torch.nn.Module) -> None:
    batch = _inputs()
    tta = TTASettings(min_sizes=(32, 48, 80), max_size=96, flip=True)
    with torch.no_grad():
        text = model.text_features()
        augmented = predict_with_tta(lambda views: model(views, text_features=text), batch, tta)
        per_view = []
        for size, flip in tta.views:  # by hand: one forward per view, mirrored views flipped back
            views = [augment_input(x, size, tta.max_size, flip) for x in batch]
            outputs = [o["sem_seg"] for o in model(views, text_features=text)]
            per_view.append([o.flip(-1) if flip else o for o in outputs])
        plain = model(batch, text_features=text)
    for i, (got, x) in enumerate(zip(augmented, batch)):
        scores = got["sem_seg"]
        assert scores.shape == (19, x["height"], x["width"])
        # CAT-Seg's sem_seg holds per-class sigmoid probabilities: each in [0, 1], no sum-to-1 over classes
        assert scores.min() >= 0 and scores.max() <= 1
        expected = torch.stack([view[i] for view in per_view]).mean(dim=0)
        torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(scores, plain[i]["sem_seg"])


def test_float_images_are_resized_with_torch_bilinear() -> None:
    image = torch.rand(3, 20, 40) * 255
    view = augment_input({"image": image}, 10, 100, flip=True)
    expected = torch.nn.functional.interpolate(
        image[None], size=(10, 20), mode="bilinear", align_corners=False
    )
    assert torch.equal(view["image"], expected[0].flip(-1))


# --------------------------------------------------------------------------------------------------
# SemLA: the same fused adapters and text features for every view (domain_orchestrator.step.segment)
# --------------------------------------------------------------------------------------------------


def test_segment_fuses_every_view_and_encodes_the_text_once(tmp_path: Path) -> None:
    model = build_tiny(seed=0).eval()
    shapes = linear_shapes(model, semla_target_modules(model))
    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        write_random_adapter(tmp_path / name, shapes, rank=4, alpha=8.0, seed=i, std=0.1)
    library = AdapterLibrary.open(tmp_path, names, model=model)
    weights = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.2, 0.8]], dtype=torch.float64)  # one row per image
    batch = _inputs()
    tta = TTASettings(min_sizes=(TEST_SIZE,), max_size=TEST_MAX, flip=True)
    with torch.no_grad():
        text = fused_text_features(model, library, weights)
        with fused_adapters(model, library, weights):
            direct = model(batch, text_features=text)
            mirrored = model(_mirrored(batch), text_features=text)
        zero_shot = model(batch)
        calls = []
        encode = model.text_features
        model.text_features = lambda *a, **k: calls.append(1) or encode(*a, **k)  # count the encodings
        try:
            augmented = segment(model, library, batch, weights, tta=tta)
        finally:
            del model.text_features
    assert len(calls) == 1  # the class prompts: once for the batch, not once per view
    for got, p, q, z in zip(augmented, direct, mirrored, zero_shot):
        assert torch.equal(got["sem_seg"], (p["sem_seg"] + q["sem_seg"].flip(-1)) / 2)
        assert not torch.allclose(p["sem_seg"], z["sem_seg"])  # the adapters do change the prediction


# --------------------------------------------------------------------------------------------------
# (e) settings: checked when TEST.AUG.ENABLED, one-line errors naming the key
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "key"),
    [
        (["TEST.AUG.MIN_SIZES", "()"], "TEST.AUG.MIN_SIZES"),
        (["TEST.AUG.MIN_SIZES", "(0, 32)"], "TEST.AUG.MIN_SIZES"),
        (["TEST.AUG.MIN_SIZES", "(-48,)"], "TEST.AUG.MIN_SIZES"),
        (["TEST.AUG.MAX_SIZE", "0"], "TEST.AUG.MAX_SIZE"),
        (["TEST.AUG.MAX_SIZE", "-1"], "TEST.AUG.MAX_SIZE"),
        (["TEST.AUG.MIN_SIZES", "(32.5,)"], "TEST.AUG.MIN_SIZES"),  # the schema's type check
    ],
    ids=["empty", "zero", "negative", "max-zero", "max-negative", "float"],
)
def test_bad_settings_are_one_line_errors_naming_the_key(opts: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(TINY_CONFIG, ["TEST.AUG.ENABLED", "True", *opts])
    message = str(error.value)
    assert key in message and "\n" not in message


def test_settings_come_from_the_config_and_matter_only_when_enabled() -> None:
    assert TTASettings.from_cfg(load_config(TINY_CONFIG)) is None
    assert TTASettings.from_cfg(load_config(TINY_CONFIG, ["TEST.AUG.MIN_SIZES", "()"])) is None  # unused
    cfg = load_config(TINY_CONFIG, ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(32, 64)"])
    tta = TTASettings.from_cfg(cfg)
    assert tta == TTASettings(min_sizes=(32, 64), max_size=4000, flip=True)
    assert len(tta.views) == 4 and "4 views" in tta.describe()
    # a max size below a min size is valid, as in detectron2: the long side's cap wins
    capped = load_config(TINY_CONFIG, ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(64,)",
                                       "TEST.AUG.MAX_SIZE", "40"])  # fmt: skip
    view = augment_input({"image": torch.zeros(3, 48, 64, dtype=torch.uint8)}, 64, 40, flip=False)
    assert TTASettings.from_cfg(capped).max_size == 40 and tuple(view["image"].shape) == (3, 30, 40)
    with pytest.raises(ValueError, match="TEST.AUG.FLIP"):
        TTASettings(min_sizes=(32,), max_size=64, flip="yes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# demo.py --tta
# --------------------------------------------------------------------------------------------------


def _demo():  # noqa: ANN202 - the demo.py module
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import demo

    return demo


def test_demo_py_tta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cat_seg.checkpoint import save_checkpoint
    from cat_seg.data import mapper_from_cfg

    weights = tmp_path / "base.pth"
    save_checkpoint(build_tiny(seed=0), weights)
    image = tmp_path / "street.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(image)
    common = ["--config-file", str(TINY_CONFIG), "--weights", str(weights), "--input", str(image)]

    def label(folder: str, *extra: str) -> np.ndarray:
        assert _demo().main([*common, "--output", str(tmp_path / folder), *extra]) == 0
        return np.asarray(Image.open(tmp_path / folder / "street_label.png"))

    plain = label("plain")
    # one view at the test size (INPUT.MIN_SIZE_TEST 48, MAX_SIZE_TEST 96), no flip: the plain prediction
    same = label(
        "one", "--tta", "TEST.AUG.MIN_SIZES", "(48,)", "TEST.AUG.MAX_SIZE", "96", "TEST.AUG.FLIP", "False"
    )
    assert np.array_equal(same, plain)
    # two scales and their flips: the argmax of the hand-averaged probabilities
    augmented = label("tta", "--tta", "TEST.AUG.MIN_SIZES", "(32, 64)")
    assert augmented.shape == (60, 90)
    cfg = load_config(TINY_CONFIG)
    model = build_tiny(seed=0).eval()
    x = mapper_from_cfg(cfg, is_train=False)({"file_name": str(image)})
    tta = TTASettings(min_sizes=(32, 64), max_size=4000, flip=True)
    with torch.no_grad():
        text = model.text_features()
        probs = predict_with_tta(lambda views: model(views, text_features=text), [x], tta)[0]["sem_seg"]
    assert np.array_equal(augmented, probs.argmax(0).numpy().astype(np.uint8))
    summary = json.loads((tmp_path / "tta" / "predictions.json").read_text())
    assert summary[0]["method"] == "zeroshot"
    capsys.readouterr()
    assert (
        _demo().main([*common, "--output", str(tmp_path / "bad"), "--tta", "TEST.AUG.MIN_SIZES", "()"]) == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("demo.py: error:") and "TEST.AUG.MIN_SIZES" in err[0]
