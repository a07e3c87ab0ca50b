"""The demo CLIP's pre-training: the dense term trains the features CAT-Seg reads, on hand-checked targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cat_seg.checkpoint import load_clip_weights
from cat_seg.modeling import CLIP, MODEL_PRESETS
from semla_demo.clip_pretrain import PRESET, dense_image_tokens, patch_targets, preprocess, pretrain, save


def test_patch_targets_are_class_shares_of_labelled_pixels() -> None:
    labels = np.full((1, 4, 4), 255, dtype=np.uint8)
    labels[0, :2, :2] = [[0, 0], [1, 255]]  # top-left patch: 2 x class 0, 1 x class 1, 1 unlabelled
    labels[0, :2, 2:] = 2  # top-right: all class 2
    # bottom-left: unlabelled only; bottom-right: one pixel of class 1
    labels[0, 3, 3] = 1
    t = patch_targets(labels, patch=2, num_classes=3)
    assert t.shape == (1, 4, 3)
    assert t[0, 0].tolist() == pytest.approx([2 / 3, 1 / 3, 0])
    assert t[0, 1].tolist() == [0, 0, 1]
    assert t[0, 2].tolist() == [0, 0, 0]
    assert t[0, 3].tolist() == [0, 1, 0]


def test_dense_tokens_equal_catseg_dense_features(tmp_path) -> None:  # noqa: ANN001
    """dense_image_tokens on the open_clip model == CAT-Seg's CLIP (dense mode) loaded from the saved file."""
    rng = np.random.default_rng(0)
    size = MODEL_PRESETS[PRESET].clip.image_size
    images = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    model, _ = pretrain(images, ["a road", "a car", "sky", "a building"], epochs=1, batch_size=4, seed=0)
    folder = save(model, tmp_path / "clip")
    ours = CLIP(MODEL_PRESETS[PRESET].clip).eval()
    load_clip_weights(ours, folder / "open_clip_model.safetensors")
    x = preprocess(images)
    with torch.no_grad():
        expected = ours.encode_image(x, dense=True)[:, 1:]
        got = dense_image_tokens(model, x)
    assert got.shape == expected.shape == (4, (size // MODEL_PRESETS[PRESET].clip.vision_patch_size) ** 2, 32)
    assert torch.allclose(got, expected, atol=1e-5)


def test_dense_term_counts_labelled_images_only() -> None:
    """All-unlabelled maps leave the losses as without labels; labelled maps add the dense cross-entropy."""
    rng = np.random.default_rng(1)
    size = MODEL_PRESETS[PRESET].clip.image_size
    images = rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    captions = [f"picture {i}" for i in range(8)]
    prompts = ["a photo of a road", "a photo of a sky"]
    unlabelled = np.full((8, size, size), 255, dtype=np.uint8)
    labels = unlabelled.copy()
    labels[:, : size // 2] = 1  # sky above, road below
    labels[:, size // 2 :] = 0
    _, plain = pretrain(images, captions, epochs=2, batch_size=8, seed=0)
    _, masked = pretrain(
        images, captions, labels=unlabelled, class_prompts=prompts, epochs=2, batch_size=8, seed=0
    )
    _, dense = pretrain(
        images, captions, labels=labels, class_prompts=prompts, epochs=2, batch_size=8, seed=0
    )
    assert masked == pytest.approx(plain, abs=1e-6)
    # the first epoch's loss is measured before any step of the dense term: contrastive + ~ln(2)
    assert dense[0] - plain[0] == pytest.approx(np.log(2), abs=0.35)
    with pytest.raises(ValueError, match="one label map per image"):
        pretrain(images, captions, labels=labels[:3], class_prompts=prompts, epochs=1)
