"""LoRA target names: the reference list for ViT-L, derived lists for other presets, clear errors."""

from __future__ import annotations

import pytest
from helpers import TINY_CONFIG, build_tiny

from cat_seg.config import CATSEG_ROOT, REFERENCE_LORA_TARGET_MODULES, load_config
from cat_seg.lora import resolve_target_modules, semla_target_modules
from cat_seg.modeling import build_model


def test_derived_selection_equals_the_reference_list_for_vitl() -> None:
    cfg = load_config(CATSEG_ROOT / "configs" / "vitl_336.yaml")
    model = build_model(cfg, "meta", class_names=False)
    assert semla_target_modules(model) == list(REFERENCE_LORA_TARGET_MODULES)
    assert resolve_target_modules(cfg.MODEL.LORA.MODUELS, model) == list(REFERENCE_LORA_TARGET_MODULES)


def test_empty_list_derives_targets_for_the_tiny_model() -> None:
    cfg = load_config(TINY_CONFIG)
    model = build_tiny()
    names = resolve_target_modules(cfg.MODEL.LORA.MODUELS, model)
    # 3 visual + 2 text blocks x 5, 2 aggregator layers x 17
    assert len(names) == 3 * 5 + 2 * 5 + 2 * 17
    assert names[0] == "sem_seg_head.predictor.clip_model.visual.transformer.resblocks.0.attn.q_proj"


def test_unknown_or_non_linear_targets_are_refused() -> None:
    model = build_tiny()
    with pytest.raises(ValueError, match=r"1 LoRA target module\(s\) do not exist.*resblocks.23"):
        resolve_target_modules(
            ["sem_seg_head.predictor.clip_model.visual.transformer.resblocks.23.mlp.c_fc"], model
        )
    with pytest.raises(ValueError, match="must be nn.Linear"):
        resolve_target_modules(["sem_seg_head.predictor.transformer.conv1"], model)
    with pytest.raises(ValueError, match="do not exist"):
        resolve_target_modules(list(REFERENCE_LORA_TARGET_MODULES), model)
