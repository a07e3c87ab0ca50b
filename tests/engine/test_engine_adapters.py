"""Adapters (attach, atomic save, checked load) and training checkpoints (resume guard), without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_testlib import TINY_CONFIG, tree_digest

from cat_seg.checkpoint import save_checkpoint
from cat_seg.config import load_config
from cat_seg.engine.checkpoint import (
    LAST_CHECKPOINT,
    ResumeError,
    check_resume_compatible,
    load_training_checkpoint,
    read_last_checkpoint,
    save_training_checkpoint,
)
from cat_seg.engine.lora import (
    AdapterError,
    attach_lora,
    load_adapter,
    lora_state_dict,
    save_adapter,
    state_digest,
    trainable_state_dict,
)
from cat_seg.modeling import build_model


def _model(seed: int = 0):  # noqa: ANN202
    torch.manual_seed(seed)
    return build_model(load_config(TINY_CONFIG), "cpu")


def _inputs() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 256, (3, 40, 56), generator=g, dtype=torch.uint8),
            "height": 40,
            "width": 56,
        }
    ]


def _predict(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(_inputs())[0]["sem_seg"]


def _lora(name: str = "dom", *, randomize: bool = True):  # noqa: ANN202
    cfg = load_config(TINY_CONFIG, ["MODEL.LORA.NAME", name])
    peft_model = attach_lora(_model(), cfg)
    if randomize:  # B starts at zero; give the adapter an effect
        with torch.no_grad():
            for key, value in lora_state_dict(peft_model, name).items():
                if ".lora_B." in key:
                    value.normal_(0, 0.05)
    return peft_model


def test_attach_lora_trains_only_lora_and_starts_as_the_base_model() -> None:
    base_out = _predict(_model())
    peft_model = _lora(randomize=False)
    names = list(trainable_state_dict(peft_model))
    assert len(names) == 118 and all(".lora_A.dom." in n or ".lora_B.dom." in n for n in names)
    assert torch.equal(_predict(peft_model.get_base_model()), base_out)
    assert len(peft_model.peft_config["dom"].target_modules) == 59


def test_save_is_atomic_and_never_replaces_without_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    peft_model = _lora()
    folder = save_adapter(peft_model, tmp_path, "dom")
    assert folder == tmp_path / "dom"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dom"]  # no model card, no temporary folder
    before = tree_digest(tmp_path)
    with pytest.raises(FileExistsError, match="dom already exists"):
        save_adapter(peft_model, tmp_path, "dom")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(peft_model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(peft_model, tmp_path, "dom", overwrite=True)
    assert tree_digest(tmp_path) == before  # the old adapter is intact, nothing left behind
    monkeypatch.undo()
    save_adapter(peft_model, tmp_path, "dom", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dom"]


def test_saved_adapter_loads_into_a_fresh_model_with_the_same_outputs(tmp_path: Path) -> None:
    peft_model = _lora()
    expected = _predict(peft_model.get_base_model())
    save_adapter(peft_model, tmp_path, "dom")
    loaded = load_adapter(_model(seed=0), tmp_path, "dom")
    torch.testing.assert_close(_predict(loaded.get_base_model()), expected, rtol=0, atol=1e-6)
    assert state_digest(lora_state_dict(loaded, "dom")) == state_digest(lora_state_dict(peft_model, "dom"))
    config = json.loads((tmp_path / "dom" / "adapter_config.json").read_text())
    assert config["target_modules"][0].startswith("sem_seg_head.predictor.clip_model.visual.transformer")


def test_default_adapter_name_still_gets_its_own_folder(tmp_path: Path) -> None:
    save_adapter(_lora("default"), tmp_path, "default")
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_load_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"adapter folder {tmp_path / 'nope'} does not exist"):
        load_adapter(_model(), tmp_path, "nope")
    save_adapter(_lora(), tmp_path, "dom")
    config_path = tmp_path / "dom" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"][0] = (
        "sem_seg_head.predictor.clip_model.visual.transformer.resblocks.9.attn.q_proj"
    )
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"adapter_config.json: 1 LoRA target module\(s\) do not exist"):
        load_adapter(_model(), tmp_path, "dom")
    (tmp_path / "dom" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        load_adapter(_model(), tmp_path, "dom")
    with pytest.raises(AdapterError, match="MODEL.LORA.NAME must be"):
        load_adapter(_model(), tmp_path, "../dom")


def test_state_digest_is_order_independent_and_exact() -> None:
    a = {"x": torch.arange(4.0), "y": torch.ones(2)}
    assert state_digest(a) == state_digest({"y": torch.ones(2), "x": torch.arange(4.0)})
    assert state_digest(a) != state_digest({"x": torch.arange(4.0) + 1e-7, "y": torch.ones(2)})


def test_training_checkpoints_and_the_resume_guard(tmp_path: Path) -> None:
    assert read_last_checkpoint(tmp_path) is None
    lora = {"name": "dom", "r": 8, "lora_alpha": 16, "target_modules": ["a.b", "c.d"]}
    path = save_training_checkpoint(
        tmp_path, "model_0000009.pth", {"model": {"w": torch.ones(2)}, "lora": lora, "iteration": 9}
    )
    assert (
        read_last_checkpoint(tmp_path) == path
        and (tmp_path / LAST_CHECKPOINT).read_text() == "model_0000009.pth"
    )
    payload = load_training_checkpoint(path)
    check_resume_compatible(payload, path, dict(lora))
    with pytest.raises(
        ResumeError, match="checkpoint of a LoRA run of adapter 'dom'.*into a full CAT-Seg fine-tuning run"
    ):
        check_resume_compatible(payload, path, None)
    with pytest.raises(ResumeError, match=r"another LoRA setting \(name: checkpoint 'dom' vs run 'other'\)"):
        check_resume_compatible(payload, path, {**lora, "name": "other"})
    full = load_training_checkpoint(
        save_training_checkpoint(tmp_path, "model_final.pth", {"model": {}, "lora": None})
    )
    with pytest.raises(ResumeError, match="full CAT-Seg fine-tuning run.*cannot be resumed into a LoRA run"):
        check_resume_compatible(full, path, lora)

    save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "plain.pth")  # a detectron2-style weights file
    with pytest.raises(ResumeError, match="plain.pth: not a training checkpoint of this trainer"):
        load_training_checkpoint(tmp_path / "plain.pth")
    (tmp_path / LAST_CHECKPOINT).write_text("model_0000099.pth")
    with pytest.raises(ResumeError, match="names 'model_0000099.pth'"):
        read_last_checkpoint(tmp_path)
