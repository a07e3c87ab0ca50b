"""Tests for cat_seg.evaluation: hand-computed metrics, invariances, errors, cityscapesScripts parity, DDP."""

from __future__ import annotations

import datetime
import json
import math
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cat_seg.evaluation import (
    SemSegEvaluator,
    category_confusion,
    cityscapes_iou_from_confusion,
    cityscapes_train_id_categories,
    confusion_from_labels,
    iou_from_confusion,
    pred_from_scores,
    semseg_metrics,
)

IGNORE = 255

# --------------------------------------------------------------------------------------------------
# Hand-computed example
# --------------------------------------------------------------------------------------------------
#
# Four classes: 0 "road", 1 "car" (present in the GT), 2 "sky" (absent from the GT but predicted once),
# 3 "bus" (absent from both: it is predicted only on ignored pixels, which do not count). A 3x4 image:
#
#   gt    = [[0, 0, 0,   0  ],      pred = [[0, 0, 0, 1],
#            [0, 0, 1,   1  ],              [2, 0, 1, 1],
#            [1, 1, 255, 255]]              [1, 0, 3, 2]]
#
# Confusion matrix, rows = GT, columns = prediction (the two ignored pixels are skipped):
#
#            p0 p1 p2 p3
#     g0  [  4, 1, 1, 0 ]    pos_gt   = [6, 4, 0, 0]
#     g1  [  1, 3, 0, 0 ]    pos_pred = [5, 4, 1, 0]
#     g2  [  0, 0, 0, 0 ]    tp       = [4, 3, 0, 0]
#     g3  [  0, 0, 0, 0 ]
#
# detectron2 convention (classes without GT are NaN and left out of the means):
#   IoU-road = 4 / (6 + 5 - 4) = 4/7          ACC-road = 4/6 = 2/3
#   IoU-car  = 3 / (4 + 4 - 3) = 3/5          ACC-car  = 3/4
#   mIoU  = (4/7 + 3/5) / 2 = 41/70
#   fwIoU = 6/10 * 4/7 + 4/10 * 3/5 = 12/35 + 6/25 = 102/175
#   mACC  = (2/3 + 3/4) / 2 = 17/24
#   pACC  = (4 + 3) / 10 = 7/10
# cityscapes convention: sky has tp + fp + fn = 1 > 0, so it counts with IoU 0; bus has 0 and is left out:
#   IoU = (4/7 + 3/5 + 0) / 3 = 41/105

HAND_NAMES = ["road", "car", "sky", "bus"]
HAND_GT = np.array([[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, IGNORE, IGNORE]], dtype=np.int64)
HAND_PRED = np.array([[0, 0, 0, 1], [2, 0, 1, 1], [1, 0, 3, 2]], dtype=np.int64)
HAND_CONF = np.array([[4, 1, 1, 0], [1, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def _hand_evaluator(convention: str = "detectron2") -> SemSegEvaluator:
    ev = SemSegEvaluator(4, ignore_label=IGNORE, class_names=HAND_NAMES, convention=convention)
    ev.process(HAND_PRED, HAND_GT, name="hand.png")
    return ev


def test_hand_example_confusion_matrix() -> None:
    np.testing.assert_array_equal(_hand_evaluator().confusion_matrix, HAND_CONF)


def test_hand_example_detectron2_convention() -> None:
    res = _hand_evaluator().evaluate()["sem_seg"]
    assert res["mIoU"] == pytest.approx(100 * 41 / 70)
    assert res["fwIoU"] == pytest.approx(100 * 102 / 175)
    assert res["mACC"] == pytest.approx(100 * 17 / 24)
    assert res["pACC"] == pytest.approx(100 * 7 / 10)
    assert res["IoU-road"] == pytest.approx(100 * 4 / 7)
    assert res["IoU-car"] == pytest.approx(100 * 3 / 5)
    assert res["ACC-road"] == pytest.approx(100 * 2 / 3)
    assert res["ACC-car"] == pytest.approx(100 * 3 / 4)
    for absent in ("sky", "bus"):
        assert math.isnan(res[f"IoU-{absent}"]) and math.isnan(res[f"ACC-{absent}"])
    assert res["num_images"] == 1
    assert "IoU" not in res and "IoU_sup" not in res


def test_hand_example_cityscapes_convention() -> None:
    res = _hand_evaluator("cityscapes").evaluate()["sem_seg"]
    assert res["IoU"] == pytest.approx(100 * 41 / 105)
    assert res["mIoU"] == pytest.approx(100 * 41 / 70)  # the detectron2 keys are still there
    assert "IoU_sup" not in res  # 4 classes: no category table


def test_hand_example_pure_functions() -> None:
    ious, valid = iou_from_confusion(HAND_CONF)
    np.testing.assert_array_equal(valid, [True, True, False, False])
    np.testing.assert_allclose(ious[:2], [4 / 7, 3 / 5])
    cs_ious, cs_valid = cityscapes_iou_from_confusion(HAND_CONF)
    np.testing.assert_array_equal(cs_valid, [True, True, True, False])
    np.testing.assert_allclose(cs_ious[:3], [4 / 7, 3 / 5, 0.0])
    assert semseg_metrics(HAND_CONF)["IoU-0"] == pytest.approx(100 * 4 / 7)  # default keys are indices


def test_cityscapes_categories_by_hand() -> None:
    """IoU_sup on the 19 Cityscapes train ids.

    Pixels (GT -> prediction): road->road 2, road->sidewalk 2, car->truck 3, person->road 1, sky->sky 2.
    Classes: road IoU 2/(4+3-2) = 2/5; sidewalk 0 (predicted, no GT); car 0; truck 0 (predicted, no GT);
    person 0; sky 1.
      detectron2 mIoU over GT classes {road, car, person, sky} = (2/5 + 0 + 0 + 1) / 4 = 7/20
      cityscapes IoU over {road, sidewalk, car, truck, person, sky} = 1.4 / 6 = 7/30
    Categories: flat tp = 2+2 = 4, fn 0, fp 1 (person->road) -> 4/5; human tp 0, fn 1 -> 0;
    vehicle tp 3 (car->truck), fn 0, fp 0 -> 1; sky 1; construction/object/nature are absent -> left out.
      IoU_sup = (4/5 + 0 + 1 + 1) / 4 = 7/10
    """
    road, sidewalk, sky, person, car, truck = 0, 1, 10, 11, 13, 14
    pairs = (
        [(road, road)] * 2 + [(road, sidewalk)] * 2 + [(car, truck)] * 3 + [(person, road)] + [(sky, sky)] * 2
    )
    gt = np.array([[g for g, _ in pairs]])
    pred = np.array([[p for _, p in pairs]])
    ev = SemSegEvaluator(19, convention="cityscapes")
    ev.process(pred, gt)
    res = ev.evaluate()["sem_seg"]
    assert res["mIoU"] == pytest.approx(100 * 7 / 20)
    assert res["IoU"] == pytest.approx(100 * 7 / 30)
    assert res["IoU_sup"] == pytest.approx(100 * 7 / 10)

    categories = cityscapes_train_id_categories()
    assert categories[road] == categories[sidewalk] == "flat" and categories[truck] == "vehicle"
    pooled, names = category_confusion(ev.confusion_matrix, categories)
    assert names == ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
    assert pooled[names.index("flat"), names.index("flat")] == 4
    assert pooled[names.index("human"), names.index("flat")] == 1


def test_cityscapes_parity_with_cityscapesscripts() -> None:
    """Our train-id evaluation equals cityscapesScripts' own label-id scoring functions."""
    ev_cs = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    from cityscapesscripts.helpers.labels import id2label, labels, trainId2label

    rng = np.random.default_rng(0)
    gt_ids = rng.integers(0, 34, size=(40, 50))  # every label id, including ignoreInEval ones
    gt_ids[:, :10] = 7  # make road frequent
    pred_train = rng.integers(0, 19, size=(40, 50))
    pred_train[pred_train == 16] = 15  # "train" predicted nowhere; it is in the GT -> IoU 0 both ways

    # Reference: (34, 34) label-id confusion matrix, rows = GT id, columns = predicted id.
    pred_ids = np.vectorize(lambda t: trainId2label[t].id)(pred_train)
    ref_conf = np.zeros((34, 34), dtype=np.ulonglong)
    np.add.at(ref_conf, (gt_ids.ravel(), pred_ids.ravel()), 1)
    args = types.SimpleNamespace(evalLabels=[lb.id for lb in labels if lb.id >= 0])
    class_scores = {lb: ev_cs.getIouScoreForLabel(lb, ref_conf, args) for lb in args.evalLabels}
    cat_scores = {c: ev_cs.getIouScoreForCategory(c, ref_conf, args) for c in ev_cs.category2labels}
    ref_iou = ev_cs.getScoreAverage(class_scores, args)
    ref_iou_sup = ev_cs.getScoreAverage(cat_scores, args)

    gt_train = np.vectorize(lambda i: IGNORE if id2label[i].ignoreInEval else id2label[i].trainId)(gt_ids)
    ev = SemSegEvaluator(19, convention="cityscapes")
    ev.process(pred_train, gt_train, name="parity.png")
    res = ev.evaluate()["sem_seg"]
    assert res["IoU"] == pytest.approx(100 * ref_iou, abs=1e-10)
    assert res["IoU_sup"] == pytest.approx(100 * ref_iou_sup, abs=1e-10)


# --------------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------------


def _random_images(seed: int, n: int = 6, num_classes: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """n (pred, gt) pairs of varying sizes; class 4 never appears in the GT, 10% of pixels are ignored."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        h, w = rng.integers(8, 24, size=2)
        gt = rng.integers(0, num_classes - 1, size=(h, w))
        pred = np.where(rng.random((h, w)) < 0.6, gt, rng.integers(0, num_classes, size=(h, w)))
        gt[rng.random((h, w)) < 0.1] = IGNORE
        images.append((pred, gt))
    return images


def _evaluate(images: list[tuple[np.ndarray, np.ndarray]], convention: str = "detectron2") -> dict:
    ev = SemSegEvaluator(5, convention=convention)
    for i, (pred, gt) in enumerate(images):
        ev.process(pred, gt, name=f"img{i}")
    return ev.evaluate()["sem_seg"]


def _assert_same_result(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), (k, a[k], b[k])


def test_perfect_prediction_is_100() -> None:
    gt = np.array([[0, 1, 2], [2, 1, IGNORE]])
    ev = SemSegEvaluator(3, convention="cityscapes")
    ev.process(gt.clip(0, 2), gt)
    res = ev.evaluate()["sem_seg"]
    res.pop("num_images")
    assert res == {k: 100.0 for k in res}


def test_image_order_does_not_matter() -> None:
    images = _random_images(1)
    _assert_same_result(_evaluate(images, "cityscapes"), _evaluate(images[::-1], "cityscapes"))


def test_splitting_an_image_changes_nothing() -> None:
    (pred, gt), *_ = _random_images(2, n=1)
    h = pred.shape[0] // 2
    whole, halves = _evaluate([(pred, gt)]), _evaluate([(pred[:h], gt[:h]), (pred[h:], gt[h:])])
    halves["num_images"] = whole["num_images"]
    _assert_same_result(whole, halves)


def test_ignore_pixels_do_not_count() -> None:
    images = _random_images(3)
    ev = SemSegEvaluator(5)
    for pred, gt in images:
        ev.process(pred, gt)
    assert ev.confusion_matrix.sum() == sum(int((gt != IGNORE).sum()) for _, gt in images)
    # Changing the predictions on ignored pixels changes nothing.
    repredicted = [(np.where(gt == IGNORE, 4 - pred, pred), gt) for pred, gt in images]
    _assert_same_result(_evaluate(images), _evaluate(repredicted))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_dtypes_and_numpy_vs_torch(dtype: type) -> None:
    images = _random_images(4)
    expected = _evaluate(images)
    _assert_same_result(expected, _evaluate([(p.astype(dtype), g.astype(dtype)) for p, g in images]))
    as_torch = [(torch.from_numpy(p.astype(dtype)), torch.from_numpy(g.astype(dtype))) for p, g in images]
    _assert_same_result(expected, _evaluate(as_torch))
    mixed = [(torch.from_numpy(p), g.astype(dtype)) for p, g in images]
    _assert_same_result(expected, _evaluate(mixed))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_numpy() -> None:
    images = _random_images(4)
    on_gpu = [(torch.from_numpy(p).cuda(), torch.from_numpy(g).to(torch.uint8).cuda()) for p, g in images]
    _assert_same_result(_evaluate(images), _evaluate(on_gpu))


def test_pred_from_scores() -> None:
    scores = torch.randn(5, 7, 9, generator=torch.Generator().manual_seed(0))
    ids = pred_from_scores(scores)
    assert ids.shape == (7, 9) and torch.equal(ids, scores.argmax(0))
    np.testing.assert_array_equal(pred_from_scores(scores.numpy()), ids.numpy())
    with pytest.raises(ValueError, match="C, H, W"):
        pred_from_scores(scores[0])


def test_merge_and_add_confusion_equal_one_pass() -> None:
    images = _random_images(5)
    a, b = SemSegEvaluator(5), SemSegEvaluator(5)
    for pred, gt in images[:2]:
        a.process(pred, gt)
    for pred, gt in images[2:]:
        b.process(pred, gt)
    a.merge(b)
    _assert_same_result(a.evaluate()["sem_seg"], _evaluate(images))
    c = SemSegEvaluator(5)
    c.add_confusion(torch.from_numpy(a.confusion_matrix), num_images=a.num_images)
    _assert_same_result(c.evaluate()["sem_seg"], _evaluate(images))
    with pytest.raises(ValueError, match="shape"):
        c.add_confusion(np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="num_classes"):
        a.merge(SemSegEvaluator(4))


def test_reset_and_repeated_evaluate() -> None:
    ev = _hand_evaluator()
    _assert_same_result(ev.evaluate()["sem_seg"], ev.evaluate()["sem_seg"])
    ev.reset()
    assert ev.confusion_matrix.sum() == 0 and ev.num_images == 0
    res = ev.evaluate()["sem_seg"]  # nothing processed: NaN, not an exception
    assert math.isnan(res["mIoU"]) and math.isnan(res["pACC"]) and res["num_images"] == 0


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gt", "match"),
    [
        (np.zeros((2, 3), dtype=np.int64), np.zeros((3, 2), dtype=np.int64), "shape"),
        (np.zeros((1, 2, 3), dtype=np.int64), np.zeros((1, 2, 3), dtype=np.int64), "2-D"),
        (np.zeros((2, 2), dtype=np.int64), np.array([[0, 1], [3, IGNORE]]), r"ground-truth.*\[3\]"),
        (np.zeros((2, 2), dtype=np.int64), np.array([[0, -1], [2, 2]]), r"ground-truth.*\[-1\]"),
        (np.array([[0, 1], [2, 3]]), np.zeros((2, 2), dtype=np.int64), r"predictions.*\[3\]"),
        (torch.tensor([[0, 1], [2, 7]]), torch.zeros(2, 2, dtype=torch.uint8), r"predictions.*\[7\]"),
        (np.zeros((2, 2), dtype=np.float32), np.zeros((2, 2), dtype=np.int64), "integer"),
    ],
)
def test_errors_name_the_image(pred: np.ndarray, gt: np.ndarray, match: str) -> None:
    ev = SemSegEvaluator(3)
    with pytest.raises(ValueError, match=match) as info:
        ev.process(pred, gt, name="frankfurt_000000_000294.png")
    assert "frankfurt_000000_000294.png" in str(info.value)
    assert ev.num_images == 0 and ev.confusion_matrix.sum() == 0  # nothing half-added


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="ignore_label"):
        SemSegEvaluator(3, ignore_label=2)
    with pytest.raises(ValueError, match="class_names"):
        SemSegEvaluator(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        SemSegEvaluator(2, class_names=["a", "a"])
    with pytest.raises(ValueError, match="convention"):
        SemSegEvaluator(3, convention="voc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="categories"):
        SemSegEvaluator(3, categories=["x"])


def test_confusion_from_labels_default_name() -> None:
    with pytest.raises(ValueError, match="image '#0'"):
        SemSegEvaluator(3).process(np.zeros((2, 2), dtype=np.int64), np.full((2, 2), 9))
    conf = confusion_from_labels(np.array([[1]]), np.array([[2]]), 3)  # one pixel: GT 2, predicted 1
    assert conf.tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 0]]


# --------------------------------------------------------------------------------------------------
# Distributed (2 gloo processes on CPU)
# --------------------------------------------------------------------------------------------------

_WORLD_SIZE = 2
_DDP_SEED = 7


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Process this rank's share of the images, evaluate twice, and write both results."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=_WORLD_SIZE,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        ev = SemSegEvaluator(5, convention="cityscapes")
        for i, (pred, gt) in enumerate(_random_images(_DDP_SEED, n=7)):
            if i % _WORLD_SIZE == rank:
                ev.process(torch.from_numpy(pred), torch.from_numpy(gt), name=f"img{i}")
        results = [ev.evaluate(), ev.evaluate()]  # the second must not double-count
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_distributed_gloo_equals_single_process(tmp_path: Path) -> None:
    ctx = mp.spawn(
        _ddp_worker, args=(str(tmp_path / "pg_init"), str(tmp_path)), nprocs=_WORLD_SIZE, join=False
    )
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
            pytest.fail("distributed workers did not finish in time")

    expected = _evaluate(_random_images(_DDP_SEED, n=7), "cityscapes")
    assert expected["num_images"] == 7
    for rank in range(_WORLD_SIZE):
        for result in json.loads((tmp_path / f"rank{rank}.json").read_text()):
            _assert_same_result(result["sem_seg"], expected)
