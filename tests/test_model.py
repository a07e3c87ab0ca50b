"""The tiny CAT-Seg end to end: inference paths, loss, gradients, vocabularies and prompt ensembles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CONFIG, build_tiny, random_inputs

from cat_seg.config import load_config
from cat_seg.modeling import build_model

NUM_CLASSES = 19  # cs19.json in the tiny config


def test_whole_image_inference_returns_probabilities_at_the_requested_size(tiny_model) -> None:  # noqa: ANN001
    tiny_model.eval()
    inputs = random_inputs(2)
    inputs[1]["height"], inputs[1]["width"] = 90, 60  # e.g. the original size before the test resize
    with torch.no_grad():
        outputs = tiny_model(inputs)
    assert [o["sem_seg"].shape for o in outputs] == [(NUM_CLASSES, 50, 70), (NUM_CLASSES, 90, 60)]
    for o in outputs:
        assert torch.isfinite(o["sem_seg"]).all()
        assert o["sem_seg"].min() >= 0 and o["sem_seg"].max() <= 1


def test_sliding_window_inference_shapes_and_batch_independence() -> None:
    model = build_tiny(
        opts=("TEST.SLIDING_WINDOW", "True", "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]")
    ).eval()
    assert model.sliding_window
    inputs = random_inputs(2)
    with torch.no_grad():
        batched = model(inputs)
        alone = [model([x])[0] for x in inputs]
    assert [o["sem_seg"].shape for o in batched] == [(NUM_CLASSES, 50, 70), (NUM_CLASSES, 41, 33)]
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a["sem_seg"], b["sem_seg"], atol=1e-5, rtol=0)


def test_sliding_window_merges_crops_like_a_plain_loop() -> None:
    """Replace the network by a known function of each view and recompute the merge with loops."""
    model = build_tiny(opts=("TEST.SLIDING_WINDOW", "True")).eval()
    kernel, out_res, res = model.sliding_kernel, model.sliding_out_res, model.clip_resolution
    stride = int(kernel * (1 - model.sliding_overlap))

    def fake_logits(clip_images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        view = F.interpolate(clip_images, size=(16, 16), mode="bilinear", align_corners=False)
        return torch.cat([view[:, :1], -view[:, 1:2]], dim=1)  # (views, 2, 16, 16)

    model._predict_logits = fake_logits
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    with torch.no_grad():
        got = model.inference_sliding_window(
            [{"image": image, "height": 30, "width": 45}], torch.zeros(2, 1, 32)
        )

    def view_probs(view: torch.Tensor) -> torch.Tensor:
        normed = (view - model.clip_pixel_mean) / model.clip_pixel_std
        normed = F.interpolate(normed[None], size=(res, res), mode="bilinear", align_corners=False)
        logits = fake_logits(normed, None)
        return F.interpolate(logits, size=(kernel, kernel), mode="bilinear", align_corners=False).sigmoid()[0]

    canvas = F.interpolate(
        image[None].float(), size=(out_res, out_res), mode="bilinear", align_corners=False
    )[0]
    total = torch.zeros(2, out_res, out_res)
    count = torch.zeros(1, out_res, out_res)
    for top in range(0, out_res - kernel + 1, stride):
        for left in range(0, out_res - kernel + 1, stride):
            total[:, top : top + kernel, left : left + kernel] += view_probs(
                canvas[:, top : top + kernel, left : left + kernel]
            )
            count[:, top : top + kernel, left : left + kernel] += 1
    whole = F.interpolate(image[None].float(), size=(kernel, kernel), mode="bilinear", align_corners=False)[0]
    glob = F.interpolate(
        view_probs(whole)[None], size=(out_res, out_res), mode="bilinear", align_corners=False
    )[0]
    merged = (total / count + glob) / 2
    expected = F.interpolate(merged[None], size=(30, 45), mode="bilinear", align_corners=False)[0]
    assert int(count.max()) == 4, "the tiny geometry overlaps 2 x 2 crops"
    torch.testing.assert_close(got[0]["sem_seg"], expected, atol=1e-6, rtol=0)


def test_training_loss_is_finite_and_gradients_reach_trainable_parameters(tiny_model) -> None:  # noqa: ANN001
    tiny_model.train()
    losses = tiny_model(random_inputs(2, sizes=((32, 32),)))
    loss = losses["loss_sem_seg"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    no_grad = [
        n
        for n, p in tiny_model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    # The last visual block runs CAT-Seg's dense path, which discards its query stream (as the original).
    assert no_grad == ["sem_seg_head.predictor.clip_model.visual.transformer.resblocks.2.attn.q_proj.weight"]
    frozen = [n for n, p in tiny_model.named_parameters() if not p.requires_grad]
    assert all("clip_model" in n for n in frozen) and frozen
    assert all(p.grad is None for n, p in tiny_model.named_parameters() if not p.requires_grad)


def test_loss_matches_hand_computation_with_ignore_pixels(tiny_model) -> None:  # noqa: ANN001
    logits = torch.tensor([[[[2.0]], [[-1.0]]], [[[0.5]], [[0.0]]]])  # (B=2, T=2, 1, 1)
    targets = torch.tensor([[[1]], [[255]]])  # image 0 is class 1; image 1 is ignored -> all-zero target
    # BCE(x, y) = softplus(x) - x*y, mean over the 4 (image, class) terms.
    sp = torch.nn.functional.softplus
    expected = (
        sp(torch.tensor(2.0)) + sp(torch.tensor(-1.0)) + 1.0 + sp(torch.tensor(0.5)) + sp(torch.tensor(0.0))
    ) / 4
    torch.testing.assert_close(tiny_model.losses(logits, targets), expected)
    with pytest.raises(ValueError, match=r"training labels must be in \[0, 2\) or 255"):
        tiny_model.losses(logits, torch.tensor([[[1]], [[7]]]))


def test_text_features_shared_or_per_image_give_the_same_result(tiny_model) -> None:  # noqa: ANN001
    tiny_model.eval()
    inputs = random_inputs(2, sizes=((40, 40),))
    with torch.no_grad():
        text = tiny_model.text_features()
        assert text.shape == (NUM_CLASSES, 1, 32)
        torch.testing.assert_close(text.norm(dim=-1), torch.ones(NUM_CLASSES, 1))
        shared = tiny_model(inputs, text_features=text)
        per_image = tiny_model(inputs, text_features=text.expand(2, -1, -1, -1))
        implicit = tiny_model(inputs)
    for a, b, c in zip(shared, per_image, implicit):
        torch.testing.assert_close(a["sem_seg"], b["sem_seg"])
        torch.testing.assert_close(a["sem_seg"], c["sem_seg"])


def test_large_vocabulary_keeps_the_best_matching_classes() -> None:
    cfg = load_config(TINY_CONFIG.with_name("tiny_a150.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert len(model.class_names) == 150 > model.sem_seg_head.predictor.transformer.pad_len
    with torch.no_grad():
        out = model(random_inputs(1))[0]["sem_seg"]
    assert out.shape == (150, 50, 70)
    kept = (out > 1e-30).flatten(1).any(dim=1)  # dropped classes get logit -100 -> ~0 probability
    assert int(kept.sum()) == 32


@pytest.mark.parametrize("ensemble, prompts", [("imagenet_select", 8), ("imagenet", 80)])
def test_prompt_ensembles(ensemble: str, prompts: int) -> None:
    model = build_tiny(opts=("MODEL.PROMPT_ENSEMBLE_TYPE", ensemble)).eval()
    assert model.sem_seg_head.predictor.transformer.conv1.in_channels == prompts
    with torch.no_grad():
        assert model.text_features().shape == (NUM_CLASSES, prompts, 32)
        assert model(random_inputs(1))[0]["sem_seg"].shape == (NUM_CLASSES, 50, 70)


def test_meta_device_build_allocates_nothing() -> None:
    model = build_model(load_config(TINY_CONFIG), "meta")
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    cpu = build_tiny().eval()
    gpu = build_tiny().eval().to("cuda")
    inputs = random_inputs(1)
    with torch.no_grad():
        a = cpu(inputs)[0]["sem_seg"]
        b = gpu(inputs)[0]["sem_seg"].cpu()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_per_image_text_features_must_match_the_number_of_images(tiny_model) -> None:  # noqa: ANN001
    model = tiny_model.eval()
    inputs = random_inputs(2)
    with torch.no_grad():
        text = model.text_features()
        per_image = text.unsqueeze(0).expand(3, -1, -1, -1)  # three rows for two images
        for sliding in (False, True):
            model.sliding_window = sliding
            with pytest.raises(ValueError, match="given for 3 images, but the batch has 2"):
                model(inputs, text_features=per_image)
            out = model(inputs, text_features=per_image[:2])  # one row per image (not per view)
            assert len(out) == 2
