"""Transforms and mappers: the ResizeShortestEdge rule, crop, colour jitter, padding, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from yacs.config import CfgNode as CN

from cat_seg.data import SemSegTestMapper, SemSegTrainMapper, load_records, mapper_from_cfg
from cat_seg.data import transforms as T


@pytest.mark.parametrize(
    ("hw", "short", "max_size", "expected"),
    [
        ((1080, 1920), 1080, 1920, (1080, 1920)),  # ACDC / MUSES test: unchanged
        ((1080, 1920), 640, 2560, (640, 1138)),  # 1920 * 640 / 1080 = 1137.8 -> 1138
        ((375, 500), 384, 1333, (384, 512)),
        ((500, 375), 384, 1333, (512, 384)),  # portrait: width is the short side
        ((100, 1000), 384, 1920, (192, 1920)),  # long side capped: 3840 -> 1920, short 384 -> 192
        ((480, 640), 468, 625, (468, 624)),  # NYU test: 640 * 468 / 480 = 624 <= 625, no cap
        ((720, 1280), 720, 1280, (720, 1280)),  # BDD test
        ((333, 777), 0, 700, (333, 777)),  # min size 0 = no-op (a150 / mv test)
        ((41, 71), 384, 1024, (384, 665)),  # 71 * 384 / 41 = 664.98 -> 665
    ],
)
def test_shortest_edge_size(hw, short, max_size, expected) -> None:
    assert T.shortest_edge_size(*hw, short, max_size) == expected


def test_resize_label_uses_torch_nearest_and_nearest_exact() -> None:
    label = np.arange(6).reshape(1, 6)
    # torch "nearest": src = floor(dst * 6 / 4) -> 0, 1, 3, 4
    np.testing.assert_array_equal(T.resize_label(label, (1, 4)), [[0, 1, 3, 4]])
    # nearest-exact: src = floor((dst + 0.5) * 6 / 4) -> 0, 2, 3, 5
    np.testing.assert_array_equal(T.resize_nearest_exact(label, (1, 4)), [[0, 2, 3, 5]])
    # 2x down, as the cs-normal 2048 -> 1024 resize: every odd column.
    np.testing.assert_array_equal(T.resize_nearest_exact(np.arange(8)[None], (1, 4)), [[1, 3, 5, 7]])


def test_padding_and_crop_sampling() -> None:
    assert T.padded_size(300, 384, 384) == (384, 384)
    assert T.padded_size(385, 10, 384) == (768, 384)
    assert T.padded_size(7, 9, -1) == (7, 9)
    img = np.zeros((2, 3, 3), np.uint8)
    padded = T.pad_bottom_right(img, (4, 5), 128)
    assert padded.shape == (4, 5, 3) and (padded[2:] == 128).all() and (padded[:, 3:] == 128).all()
    # A crop in a label half 0 / half 1 under a 0.75 constraint must hold both classes.
    label = np.zeros((100, 100), np.int64)
    label[:, 50:] = 1
    for seed in range(20):
        box = T.sample_crop(label, (40, 40), 0.75, 255, np.random.default_rng(seed))
        counts = np.bincount(T.crop(label, box).ravel(), minlength=2)
        assert box[2:] == (40, 40) and counts.min() > 0 and counts.max() < 0.75 * counts.sum()
    assert T.sample_crop(label, (200, 30), 1.0, 255, np.random.default_rng(0))[2:] == (100, 30)


def test_color_aug_ssd_is_seeded_and_hsv_round_trips() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(16, 16, 3)).astype(np.uint8)
    back = T.hsv_to_rgb_u8(T.rgb_to_hsv_u8(img))
    assert np.abs(back.astype(int) - img.astype(int)).max() <= 5  # 8-bit hue has 2-degree steps
    hsv = T.rgb_to_hsv_u8(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 10, 10]]], np.uint8))
    np.testing.assert_array_equal(hsv[0, :, 0], [0, 60, 120, 0])  # OpenCV 8-bit hue = degrees / 2
    np.testing.assert_array_equal(hsv[0, :, 1], [255, 255, 255, 0])
    a = T.color_aug_ssd(img, np.random.default_rng(5))
    b = T.color_aug_ssd(img, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    outs = {T.color_aug_ssd(img, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(outs) > 4 and a.dtype == np.uint8


def _record(root: Path, name: str) -> dict:
    return load_records(name, root)[0]


def test_test_mapper_resizes_image_and_keeps_label(synthetic_root: Path) -> None:
    record = _record(synthetic_root, "bdd_sem_seg_val")
    h, w = record["height"], record["width"]
    out = SemSegTestMapper(min_size=100, max_size=1000)(record)
    new_h, new_w = T.shortest_edge_size(h, w, 100, 1000)
    assert out["image"].shape == (3, new_h, new_w) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"]) == (h, w)
    assert out["sem_seg"].shape == (h, w) and out["sem_seg"].dtype == torch.int64
    assert out["file_name"] == record["file_name"]
    same = SemSegTestMapper(min_size=0, max_size=1000)(record)
    assert same["image"].shape == (3, h, w)
    bgr = SemSegTestMapper(min_size=0, max_size=1000, image_format="BGR")(record)
    assert torch.equal(bgr["image"], same["image"].flip(0))
    assert "sem_seg" not in SemSegTestMapper(min_size=0, max_size=1, load_label=False)(record)


def test_cityscapes_test_mapper_is_1024x512(synthetic_root: Path) -> None:
    record = _record(synthetic_root, "cs-normal_sem_seg_val")
    out = SemSegTestMapper(min_size=512, max_size=1024, resize_to=(1024, 512))(record)
    assert out["image"].shape == (3, 512, 1024)
    assert (out["height"], out["width"]) == (512, 1024)  # prediction size, as the reference
    assert out["sem_seg"].shape == (record["height"], record["width"])  # evaluation at original size


TRAIN_KW = dict(min_sizes=(96,), max_size=400, crop_size=(64, 64), size_divisibility=64)


def test_train_mapper_shapes_padding_and_determinism(synthetic_root: Path) -> None:
    record = _record(synthetic_root, "mv_sem_seg_train")
    mapper = SemSegTrainMapper(**TRAIN_KW, ignore_label=65, num_classes=65)
    a = mapper(record, np.random.default_rng(1))
    b = mapper(record, np.random.default_rng(1))
    assert a["image"].shape == (3, 64, 64) and a["sem_seg"].shape == (64, 64)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["sem_seg"], b["sem_seg"])
    others = [mapper(record, np.random.default_rng(s)) for s in range(2, 6)]
    assert any(not torch.equal(a["image"], o["image"]) for o in others)
    # crop larger than the resized image -> padding: image 128, label = ignore (65 for Mapillary)
    big = SemSegTrainMapper(
        min_sizes=(40,),
        max_size=60,
        crop_size=(80, 80),
        size_divisibility=80,
        ignore_label=65,
        color_aug_ssd=False,
    )
    out = big(record, np.random.default_rng(0))
    h, w = T.shortest_edge_size(record["height"], record["width"], 40, 60)
    assert out["image"].shape == (3, 80, 80)
    assert (out["image"][:, h:, :] == 128).all() and (out["image"][:, :, w:] == 128).all()
    assert (out["sem_seg"][h:, :] == 65).all() and (out["sem_seg"][:, w:] == 65).all()
    assert (out["sem_seg"][:h, :w] != 255).all()


def test_train_mapper_pads_label_with_255_by_default(synthetic_root: Path) -> None:
    record = _record(synthetic_root, "a150_sem_seg_train")
    out = SemSegTrainMapper(min_sizes=(40,), max_size=60, crop_size=None, size_divisibility=128)(
        record, np.random.default_rng(0)
    )
    assert out["sem_seg"].shape == (128, 128) and (out["sem_seg"][100:] == 255).all()


def test_cityscapes_train_mapper_resizes_to_1024x512_first(synthetic_root: Path) -> None:
    record = _record(synthetic_root, "cs-normal_sem_seg_train")
    mapper = SemSegTrainMapper(
        min_sizes=(384,),
        max_size=1024,
        resize_to=(1024, 512),
        crop_size=(384, 384),
        size_divisibility=384,
        color_aug_ssd=False,
        flip_prob=0.0,
    )
    out = mapper(record, np.random.default_rng(0))
    assert out["image"].shape == (3, 384, 384) and out["sem_seg"].shape == (384, 384)
    # 1024x512 -> short side 384 -> 768x384: the crop spans the full height, so no label padding.
    assert (out["sem_seg"] != 255).any()


def _cfg(mapper_name: str = "mask_former_semantic") -> CN:
    cfg = CN()
    cfg.MODEL = CN()
    cfg.MODEL.SEM_SEG_HEAD = CN()
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 65
    cfg.INPUT = CN()
    cfg.INPUT.DATASET_MAPPER_NAME = mapper_name
    cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = 3984
    cfg.INPUT.MIN_SIZE_TEST = 0
    cfg.INPUT.MAX_SIZE_TEST = 3984
    cfg.INPUT.CROP = CN()
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (64, 64)
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.INPUT.COLOR_AUG_SSD = True
    cfg.INPUT.SIZE_DIVISIBILITY = 64
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def test_mapper_from_cfg(synthetic_root: Path) -> None:
    train = mapper_from_cfg(_cfg(), is_train=True)
    assert isinstance(train, SemSegTrainMapper)
    assert (train.min_sizes, train.crop_size, train.ignore_label, train.size_divisibility) == (
        (96,),
        (64, 64),
        65,
        64,
    )
    assert train.color_aug_ssd and train.resize_to is None
    test = mapper_from_cfg(_cfg(), is_train=False)
    assert isinstance(test, SemSegTestMapper) and (test.min_size, test.max_size) == (0, 3984)
    cs = mapper_from_cfg(_cfg("resized_mask_former_semantic"), is_train=False)
    assert cs.resize_to == (1024, 512)
    out = train(_record(synthetic_root, "mv_sem_seg_train"), np.random.default_rng(0))
    assert out["image"].shape == (3, 64, 64)
    bad = _cfg("detr_panoptic")
    with pytest.raises(ValueError, match="DATASET_MAPPER_NAME"):
        mapper_from_cfg(bad, is_train=True)
