"""``MODEL.LORA.REFERENCE_TRAINING``: LoRA training as the original SemLA trainer did it (issue 13).

Two behaviours of the original (docs/differences.md#q1, docs/differences.md#q2) come back in that mode,
and only there: the LoRA on the CLIP attention q/k/v projections is inert (in the adapter, never applied,
B zero), and during training both decoder guidance features come from the first guidance block;
evaluation uses the configured blocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_testlib import TINY_CONFIG, lora_opts, make_root, single_thread, train_net
from helpers import load_fixture
from safetensors.torch import load_file

from cat_seg.config import CATSEG_ROOT, load_config, lora_target_modules
from cat_seg.engine import unwrap_model
from cat_seg.engine.lora import attach_lora, lora_config_from_cfg, trainable_state_dict
from cat_seg.lora import TRAINING_RECORD_NAME, LoraModel, clip_attention_projections, resolve_target_modules
from cat_seg.modeling import build_model

NAME = "dom"
REFERENCE = ("MODEL.LORA.REFERENCE_TRAINING", "True")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def _cfg(*opts: str):  # noqa: ANN202 - CfgNode
    return load_config(TINY_CONFIG, ["MODEL.LORA.NAME", NAME, *opts])


def _base(cfg, seed: int = 0) -> torch.nn.Module:  # noqa: ANN001
    torch.manual_seed(seed)
    return build_model(cfg, "cpu")


def _batch() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8),
            "sem_seg": torch.randint(0, 19, (32, 32), generator=g),
        }
        for _ in range(2)
    ]


def _is_qkv(name: str) -> bool:
    return bool(clip_attention_projections([name.split(".lora_")[0].removeprefix("base_model.model.")]))


# --------------------------------------------------------------------------------------------------
# The adapter: the original's tensors, q/k/v inert
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [(), REFERENCE], ids=["default", "reference"])
def test_vitl336_adapter_has_the_original_428_tensor_names(opts: tuple[str, ...]) -> None:
    fixture = load_fixture("semla_lora_adapter_keys.json")
    cfg = load_config(
        CATSEG_ROOT / "configs/cityscapes/normal/lora-normal.yaml", ["MODEL.LORA.NAME", NAME, *opts]
    )
    model = build_model(cfg, "meta", class_names=False)
    adapted = attach_lora(model, cfg)
    saved = adapted.adapter_state_dict(NAME)
    assert len(saved) == 428 and set(saved) == set(fixture["adapter_tensors"])
    for key, value in saved.items():
        assert list(value.shape) == fixture["adapter_tensors"][key]["shape"], key
    inert = adapted.inert_modules[NAME]
    assert len(inert) == (108 if opts else 0)
    assert model.train_guidance_layers == ((7, 7) if opts else None) and model.guidance_layers == (7, 15)


def test_qkv_lora_b_stays_exactly_zero_while_the_rest_trains() -> None:
    cfg = _cfg(*REFERENCE)
    adapted = attach_lora(_base(cfg), cfg)
    initial = {k: v.clone() for k, v in trainable_state_dict(adapted).items()}
    qkv = [k for k in initial if _is_qkv(k)]
    assert len(qkv) == 2 * 3 * (3 + 2)  # A and B of q/k/v in 3 visual + 2 text blocks
    params = dict(adapted.named_parameters())
    # The optimizer holds the inert factors too (trainable, as PEFT had them): AdamW skips them, no gradient.
    optimizer = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=0.01)
    adapted.train()
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        sum(adapted(_batch()).values()).backward()
        assert all(params[k].grad is None for k in qkv)
        optimizer.step()
    after = trainable_state_dict(adapted)
    for key in qkv:
        assert torch.equal(after[key], initial[key]), key  # A as drawn, B zero: never changed
        if ".lora_B." in key:
            assert not after[key].any()
    assert all(after[k].abs().max() > 0 for k in initial if ".lora_B." in k and not _is_qkv(k))


# --------------------------------------------------------------------------------------------------
# Guidance: first block twice in training, the configured blocks in eval
# --------------------------------------------------------------------------------------------------


def _guidance_inputs(
    model: torch.nn.Module, inputs: list[dict]
) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
    """Outputs of the guidance CLIP blocks and the inputs of upsample1 / upsample2 in one forward pass."""
    catseg = unwrap_model(model)
    blocks, seen = {}, []
    handles = [
        catseg.clip_model.visual.transformer.resblocks[i].register_forward_hook(
            lambda _m, _i, out, i=i: blocks.__setitem__(i, out.detach())
        )
        for i in catseg.guidance_layers
    ]
    handles += [
        up.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
        for up in (catseg.upsample1, catseg.upsample2)
    ]
    try:
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return blocks, seen


def _as_map(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, 1 + h*w, C) block output -> (B, C, h, w), CLS dropped (what the upsamplers get)."""
    return tokens[:, 1:].transpose(1, 2).reshape(like.shape)


def test_guidance_is_the_first_block_twice_in_training_and_the_configured_blocks_in_eval() -> None:
    cfg = _cfg(*REFERENCE)
    adapted = attach_lora(_base(cfg), cfg)
    first, second = unwrap_model(adapted).guidance_layers
    assert (first, second) == (0, 1)

    adapted.train()
    blocks, (up1, up2) = _guidance_inputs(adapted, _batch())
    assert torch.equal(up1, _as_map(blocks[first], up1)) and torch.equal(up2, _as_map(blocks[first], up2))
    assert not torch.equal(up2, _as_map(blocks[second], up2))

    adapted.eval()
    with torch.no_grad():
        blocks, (up1, up2) = _guidance_inputs(adapted, [{"image": b["image"]} for b in _batch()])
    assert torch.equal(up1, _as_map(blocks[first], up1)) and torch.equal(up2, _as_map(blocks[second], up2))

    default = _cfg()
    plain = attach_lora(_base(default), default)  # default mode: the configured blocks in training too
    plain.train()
    blocks, (_, up2) = _guidance_inputs(plain, _batch())
    assert torch.equal(up2, _as_map(blocks[second], up2))


def test_one_step_equals_a_hand_built_model_feeding_the_first_block_twice() -> None:
    """Loss and gradients of one step equal those of PEFT on a model whose guidance layers are (g0, g0)
    and whose adapter leaves the CLIP q/k/v projections out."""
    from peft import get_peft_model

    cfg = _cfg(*REFERENCE)
    adapted = attach_lora(_base(cfg), cfg)
    with torch.no_grad():  # give every effective B a value, so A gets gradients too
        for key, value in trainable_state_dict(adapted).items():
            if ".lora_B." in key and not _is_qkv(key):
                value.normal_(0, 0.05)

    hand_built = _base(cfg)
    hand_built.guidance_layers = (hand_built.guidance_layers[0],) * 2
    targets = resolve_target_modules(lora_target_modules(cfg), hand_built)
    kept = [t for t in targets if t not in clip_attention_projections(targets)]
    oracle = get_peft_model(hand_built, lora_config_from_cfg(cfg, kept), adapter_name=NAME)
    lora = {k: v for k, v in adapted.state_dict().items() if ".lora_" in k and not _is_qkv(k)}
    copied = oracle.load_state_dict(lora, strict=False)  # base weights: the same seed built them
    assert not copied.unexpected_keys and all(".lora_" not in k for k in copied.missing_keys)

    losses = []
    for model in (adapted, oracle):
        model.train()
        loss = model(_batch())["loss_sem_seg"]
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    native_params, oracle_params = dict(adapted.named_parameters()), dict(oracle.named_parameters())
    compared = 0
    for key, param in native_params.items():
        if not param.requires_grad:
            continue
        if _is_qkv(key):
            assert param.grad is None, key  # inert: never applied, no gradient
            continue
        torch.testing.assert_close(param.grad, oracle_params[key].grad, rtol=1e-5, atol=1e-7)
        compared += 1
    assert compared == len(kept) * 2
    assert any(
        float(p.grad.abs().max()) > 0
        for k, p in native_params.items()
        if ".lora_A." in k and p.grad is not None
    )


# --------------------------------------------------------------------------------------------------
# A run: train_net.py in that mode, its records, evaluation, the library
# --------------------------------------------------------------------------------------------------


def test_a_reference_run_records_the_mode_and_its_adapter_is_evaluated_with_the_right_blocks(
    tmp_path: Path,
) -> None:
    from peft import PeftModel

    from cat_seg.engine import run
    from domain_orchestrator.library import AdapterLibrary

    root, base = make_root(tmp_path)
    out, db = tmp_path / "out", tmp_path / "db"
    tn = train_net()
    default_argv = [
        "--config-file", str(TINY_CONFIG), "--data-root", str(root), "--resume", "--no-progress",
        *lora_opts(out, db, base, max_iter=4),
    ]  # fmt: skip
    argv = [*default_argv, *REFERENCE]
    outcome = run(tn.plan_from_args(tn.build_parser().parse_args(argv)))
    catseg = unwrap_model(outcome.model)
    assert catseg.train_guidance_layers == (0, 0) and isinstance(outcome.model, LoraModel)

    adapter = db / "x"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        TRAINING_RECORD_NAME,
    ]
    record = json.loads((adapter / TRAINING_RECORD_NAME).read_text())
    assert record["reference_training"] is True and record["train_guidance_layers"] == [0, 0]
    assert record["guidance_layers"] == [0, 1]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    qkv_b = [k for k in tensors if _is_qkv(k) and ".lora_B." in k]
    assert len(qkv_b) == 15 and all(not tensors[k].any() for k in qkv_b)
    assert all(tensors[k].any() for k in tensors if ".lora_B." in k and not _is_qkv(k))
    assert "REFERENCE_TRAINING: true" in (out / "config.yaml").read_text()
    assert json.loads((out / "run_info.json").read_text())["lora_reference_training"] is True

    # Resuming this run in the default mode is refused (the checkpoint records the mode).
    assert tn.main(default_argv) == 1

    # Evaluation of that adapter: the configured blocks (eval mode), the same numbers as the run's own.
    eval_argv = [
        "--config-file", str(TINY_CONFIG), "--data-root", str(root), "--eval-only", "--no-progress",
        *lora_opts(out / "eval", db, base),
    ]  # fmt: skip
    assert tn.main(eval_argv) == 0
    final = json.loads(next((out / "inference").glob("*/metrics.json")).read_text())["sem_seg"]
    evaluated = json.loads(next((out / "eval" / "inference").glob("*/metrics.json")).read_text())["sem_seg"]
    assert (final["IoU"], final["mIoU"], final["pACC"]) == (
        evaluated["IoU"],
        evaluated["mIoU"],
        evaluated["pACC"],
    )
    assert json.loads((out / "eval" / "run_info.json").read_text())["lora_reference_training"] is False

    # PEFT loads the folder (the extra file is ignored); the library reports the mode.
    PeftModel.from_pretrained(build_model(_cfg(), "cpu"), str(adapter), adapter_name="x")
    library = AdapterLibrary.open(db)
    assert [i.reference_training for i in library.infos] == [True]


def test_reference_training_needs_lora_and_the_native_lora(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, base = make_root(tmp_path)
    common = ["--config-file", str(TINY_CONFIG), "--data-root", str(root), "--no-progress", *REFERENCE]
    opts = ["OUTPUT_DIR", str(tmp_path / "out"), "MODEL.WEIGHTS", str(base), "MODEL.LORA.ENABLED", "False"]
    assert train_net().main([*common, *opts]) == 1
    assert (
        "MODEL.LORA.REFERENCE_TRAINING True reproduces the original LoRA trainer" in capsys.readouterr().err
    )
    cfg = _cfg(*REFERENCE, "MODEL.LORA.USE_DORA", "True")
    with pytest.raises(ValueError, match="REFERENCE_TRAINING True needs the native LoRA.*use_dora=True"):
        attach_lora(_base(cfg), cfg)
