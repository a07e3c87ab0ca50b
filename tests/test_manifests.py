"""Names and shapes of the released CAT-Seg checkpoints and SemLA adapters, checked on the meta device."""

from __future__ import annotations

import pytest
import torch
from helpers import load_fixture
from peft import LoraConfig, get_peft_model

from cat_seg.config import CATSEG_ROOT, load_config
from cat_seg.modeling import build_model

PRESETS = {
    "vitl_336": ("catseg_vitl336_state_dict.json", "cityscapes/normal/lora-normal.yaml", []),
    "vitb_384": (
        "catseg_vitb384_state_dict.json",
        "vitb_384.yaml",
        ["MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", "datasets/cs19.json"],
    ),
}


def _meta_model(preset: str):  # noqa: ANN202
    _, config, opts = PRESETS[preset]
    return build_model(load_config(CATSEG_ROOT / "configs" / config, opts), "meta", class_names=False)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_state_dict_matches_released_checkpoint(preset: str) -> None:
    manifest = load_fixture(PRESETS[preset][0])
    model = _meta_model(preset)
    state = model.state_dict()
    assert list(state) == list(manifest["keys"]), "names and order of the reference state dict"
    for name, shape in manifest["keys"].items():
        assert list(state[name].shape) == shape, name
        assert state[name].device.type == "meta"
    counts = manifest["counts"]
    assert sum(p.numel() for p in model.parameters()) == counts["unique_parameters_numel"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == counts["trainable_numel_clip_finetune_attention"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tied_attention_aliases_are_the_same_tensor(preset: str) -> None:
    manifest = load_fixture(PRESETS[preset][0])
    state = _meta_model(preset).state_dict(keep_vars=True)
    assert len(manifest["tied"]) == manifest["num_tied_groups"]
    for group in manifest["tied"]:
        first = state[group[0]]
        assert all(state[name] is first for name in group[1:]), group


def test_trainable_parameters_match_clip_finetune_attention() -> None:
    manifest = load_fixture(PRESETS["vitl_336"][0])
    model = _meta_model("vitl_336")
    clip_names = {n for n, p in model.named_parameters() if p.requires_grad and "clip_model" in n}
    # The reference lists the tied q/v weights under their ``*_proj_weight`` alias.
    expected = {
        n.replace("q_proj_weight", "q_proj.weight").replace("v_proj_weight", "v_proj.weight")
        for n in manifest["requires_grad_true_params"]
        if "clip_model" in n
    }
    assert clip_names == expected


def test_semla_lora_targets_resolve_to_linear_layers() -> None:
    adapters = load_fixture("semla_lora_adapter_keys.json")
    cfg = load_config(CATSEG_ROOT / "configs" / PRESETS["vitl_336"][1])
    model = _meta_model("vitl_336")
    modules = dict(model.named_modules())
    tensors = adapters["adapter_tensors"]
    targets = set(adapters["adapter_config_json"]["target_modules"])
    assert len(targets) == 214 and targets == set(cfg.MODEL.LORA.MODUELS)
    for target in targets:
        layer = modules[target]
        assert isinstance(layer, torch.nn.Linear), target
        a = tensors[f"base_model.model.{target}.lora_A.weight"]["shape"]
        b = tensors[f"base_model.model.{target}.lora_B.weight"]["shape"]
        assert a == [8, layer.in_features] and b == [layer.out_features, 8], target


def test_peft_injection_gives_the_reference_adapter_and_state_dict() -> None:
    from peft import get_peft_model_state_dict

    adapters = load_fixture("semla_lora_adapter_keys.json")
    cfg = load_config(CATSEG_ROOT / "configs" / PRESETS["vitl_336"][1])
    model = _meta_model("vitl_336")
    before = set(model.state_dict())
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(cfg.MODEL.LORA.MODUELS))
    with torch.device("meta"):
        peft_model = get_peft_model(model, config, adapter_name="cs-normal")
    saved = get_peft_model_state_dict(peft_model, adapter_name="cs-normal")
    assert {f"base_model.model.{k}" if not k.startswith("base_model") else k for k in saved} == set(
        adapters["adapter_tensors"]
    )
    injected = adapters["injected_catseg_state_dict"]
    after = set(peft_model.base_model.model.state_dict())
    assert len(after) == injected["num_keys"]
    assert before - after == set(injected["removed_keys"])
    assert after - before == set(injected["added_keys"])
