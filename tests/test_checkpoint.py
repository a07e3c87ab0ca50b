"""CAT-Seg checkpoints: the three attention spellings, detectron2 layout, and malformed files."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny, random_inputs

from cat_seg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ATTN = ".attn."


def _spelled(state: dict[str, torch.Tensor], spelling: str) -> dict[str, torch.Tensor]:
    """The tiny model's state dict written as SemLA, upstream CAT-Seg or OpenAI CLIP would write it."""
    out = dict(state)
    prefixes = sorted({k.split(ATTN)[0] + ATTN for k in state if k.endswith("attn.q_proj_weight")})
    assert prefixes, "the state dict has CLIP attention blocks"
    for p in prefixes:
        if spelling == "semla":  # both the alias and the Linear weight
            continue
        for w in "qkv":
            out.pop(f"{p}{w}_proj.weight")
        if spelling == "openai":  # packed in_proj_weight only
            out[f"{p}in_proj_weight"] = torch.cat([out.pop(f"{p}{w}_proj_weight") for w in "qkv"])
    return out


def _outputs(model) -> list[torch.Tensor]:  # noqa: ANN001
    model.eval()
    with torch.no_grad():
        return [o["sem_seg"] for o in model(random_inputs())]


@pytest.mark.parametrize("spelling", ["semla", "upstream", "openai"])
def test_round_trip_in_each_attention_spelling(tmp_path, spelling: str) -> None:  # noqa: ANN001
    source = build_tiny(seed=0)
    state = _spelled(source.state_dict(), spelling)
    path = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 7}, path)  # detectron2's layout

    target = build_tiny(seed=1)
    assert not torch.equal(
        target.state_dict()[
            "sem_seg_head.predictor.clip_model.visual.transformer.resblocks.0.attn.q_proj.weight"
        ],
        source.state_dict()[
            "sem_seg_head.predictor.clip_model.visual.transformer.resblocks.0.attn.q_proj.weight"
        ],
    )
    result = load_checkpoint(target, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    for a, b in zip(_outputs(source), _outputs(target)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bare_state_dict_with_ddp_prefix_and_save_checkpoint(tmp_path) -> None:  # noqa: ANN001
    source = build_tiny(seed=0)
    bare = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, bare)
    target = build_tiny(seed=1)
    load_checkpoint(target, bare)
    saved = save_checkpoint(target, tmp_path / "out" / "model_final.pth", iteration=3)
    assert [p.name for p in saved.parent.iterdir()] == ["model_final.pth"], "no temporary file left behind"
    again = build_tiny(seed=2)
    load_checkpoint(again, saved)
    for name, value in source.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_wrong_shape_is_refused_with_key_and_file(tmp_path) -> None:  # noqa: ANN001
    state = build_tiny().state_dict()
    key = "sem_seg_head.predictor.transformer.conv1.weight"
    state[key] = torch.zeros(3, 3)
    path = tmp_path / "bad_shape.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="bad_shape.pth") as err:
        load_checkpoint(build_tiny(), path)
    assert key in str(err.value)


def test_missing_and_unexpected_keys(tmp_path) -> None:  # noqa: ANN001
    state = build_tiny().state_dict()
    state.pop("upsample1.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"partial.pth: 1 missing key\(s\) \[upsample1.weight\]"):
        load_checkpoint(build_tiny(), path)
    result = load_checkpoint(build_tiny(), path, strict=False)
    assert result.missing_keys == ["upsample1.weight"]
    assert result.unexpected_keys == ["extra.weight"]


def test_files_that_are_not_checkpoints(tmp_path) -> None:  # noqa: ANN001
    model = build_tiny()
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(model, garbage)
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="list.pth: expected a state dict"):
        load_checkpoint(model, listing)
    mixed = tmp_path / "mixed.pth"
    torch.save({"model": {"a": torch.zeros(1), "b": "text"}}, mixed)
    with pytest.raises(CheckpointError, match="mixed.pth: entries that are not tensors: b"):
        load_checkpoint(model, mixed)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_checkpoint(model, tmp_path / "nowhere.pth")


def test_pickled_code_is_refused(tmp_path) -> None:  # noqa: ANN001
    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint(build_tiny(), path)


def test_base_weights_load_under_attached_lora(tmp_path) -> None:  # noqa: ANN001
    from peft import LoraConfig, get_peft_model

    source = build_tiny(seed=0)
    path = tmp_path / "model_final.pth"
    save_checkpoint(source, path)
    target = build_tiny(seed=1)
    targets = [
        "sem_seg_head.predictor.clip_model.visual.transformer.resblocks.0.attn.q_proj",
        "sem_seg_head.predictor.clip_model.visual.transformer.resblocks.0.mlp.c_fc",
    ]
    get_peft_model(target, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    result = load_checkpoint(target, path, strict=False)
    assert result.unexpected_keys == []
    assert all("lora_" in k for k in result.missing_keys) and result.missing_keys
    block = target.sem_seg_head.predictor.clip_model.visual.transformer.resblocks[0]
    ref = source.sem_seg_head.predictor.clip_model.visual.transformer.resblocks[0]
    assert torch.equal(block.attn.q_proj.base_layer.weight, ref.attn.q_proj.weight)
    assert torch.equal(block.mlp.c_fc.base_layer.weight, ref.mlp.c_fc.weight)
