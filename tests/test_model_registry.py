"""The model registry (``MODEL.META_ARCHITECTURE`` -> builder) and the ``SegmentationModel`` protocol."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_CONFIG
from torch import nn

from cat_seg.config import load_config
from cat_seg.modeling import (
    MODEL_REGISTRY,
    CATSeg,
    SegmentationModel,
    build_model,
    register_model,
    unregister_model,
)
from cat_seg.modeling.build import build_catseg_model
from cat_seg.modeling.interface import SegmentationModel as InterfaceSegmentationModel

PROTOCOL_MEMBERS = (
    "train_class_names",
    "test_class_names",
    "class_tokens",
    "set_class_names",
    "text_features",
    "__call__",
    "sliding_window",
    "clip_model",
    "clip_resolution",
    "clip_pixel_mean",
    "clip_pixel_std",
    "training",
    "train",
    "eval",
    "named_modules",
    "named_parameters",
    "state_dict",
    "load_state_dict",
)
#: CAT-Seg's own members, optional in the protocol (the LoRA target selection, reference training).
CATSEG_MEMBERS = ("sem_seg_head", "guidance_layers", "train_guidance_layers")


def test_catseg_is_registered_under_its_meta_architecture() -> None:
    assert MODEL_REGISTRY["CATSeg"] is build_catseg_model
    assert SegmentationModel is InterfaceSegmentationModel


def test_the_tiny_catseg_satisfies_the_protocol(tiny_model) -> None:  # noqa: ANN001
    assert isinstance(tiny_model, CATSeg)
    assert isinstance(tiny_model, SegmentationModel)
    for member in PROTOCOL_MEMBERS + CATSEG_MEMBERS:
        assert hasattr(tiny_model, member), member
    # The members checked here are exactly the protocol's (CAT-Seg's own are not in it).
    public = {m for m in dir(SegmentationModel) if not m.startswith("_")} | {"__call__"}
    assert set(PROTOCOL_MEMBERS) == public
    # What the members return, as the protocol describes it.
    assert (
        tiny_model.train_class_names == tiny_model.test_class_names and len(tiny_model.test_class_names) == 19
    )
    assert tiny_model.class_tokens.shape[:2] == (19, len(tiny_model.sem_seg_head.predictor.templates))
    tiny_model.eval()
    with torch.no_grad():
        text = tiny_model.text_features()
        out = tiny_model([{"image": torch.zeros(3, 20, 30, dtype=torch.uint8)}], text_features=text)
    assert text.shape[:2] == (19, tiny_model.class_tokens.shape[1])
    assert out[0]["sem_seg"].shape == (19, 20, 30)
    assert len(tiny_model.guidance_layers) == 2 and tiny_model.train_guidance_layers is None
    assert tiny_model.clip_pixel_mean.shape == tiny_model.clip_pixel_std.shape == (3, 1, 1)


def test_an_object_without_the_members_is_not_a_segmentation_model() -> None:
    assert not isinstance(nn.Linear(2, 2), SegmentationModel)


def test_an_unknown_meta_architecture_is_refused_naming_the_registered_ones() -> None:
    cfg = load_config(TINY_CONFIG, ["MODEL.META_ARCHITECTURE", "NoSuchModel"])
    with pytest.raises(ValueError, match=r"'NoSuchModel'.*\['CATSeg'") as info:
        build_model(cfg, "meta", class_names=False)
    for name in MODEL_REGISTRY:
        assert repr(name) in str(info.value)


def test_a_registered_toy_model_is_built_through_build_model() -> None:
    calls = []

    @register_model("ToyModel")
    def build_toy(cfg, device="cpu", *, class_names=True):  # noqa: ANN001, ANN202
        calls.append((cfg.MODEL.META_ARCHITECTURE, str(device), class_names))
        with torch.device(device):
            return nn.Linear(3, 4)

    try:
        assert MODEL_REGISTRY["ToyModel"] is build_toy
        with pytest.raises(ValueError, match="already registered"):
            register_model("ToyModel")(build_toy)
        cfg = load_config(TINY_CONFIG, ["MODEL.META_ARCHITECTURE", "ToyModel"])
        model = build_model(cfg, "cpu", class_names=False)
        assert isinstance(model, nn.Linear) and model.weight.shape == (4, 3)
        assert calls == [("ToyModel", "cpu", False)]
        assert not isinstance(model, SegmentationModel)
    finally:
        unregister_model("ToyModel")
    assert "ToyModel" not in MODEL_REGISTRY
    with pytest.raises(ValueError, match="'ToyModel' is not a registered model"):
        build_model(cfg, "cpu")
