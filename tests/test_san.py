"""SAN (``MODEL.META_ARCHITECTURE: "SAN"``) on the tiny preset: the model interface, the original's state-dict
names, the LoRA targets, LoRA training, the loss against a hand computation, and the fused multi-adapter
forward against real PEFT.

The oracles are independent computations: a brute force over all query/target assignments and a NumPy
point sampler for the criterion, PEFT (``get_peft_model``, ``add_weighted_adapter(..., "cat")``) for LoRA,
module paths written out from the architectures' depths for the LoRA targets, and the key/shape lists
dumped from the original SAN code (``tests/fixtures/san_*_state_dict.json``) for the big presets.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FIXTURES, REPO_ROOT
from torch import nn

from cat_seg.config import load_config, resolve_catseg_path
from cat_seg.lora import resolve_target_modules, semla_target_modules
from cat_seg.modeling import MODEL_REGISTRY, SAN, SegmentationModel, build_model
from cat_seg.modeling.clip import Attention
from cat_seg.modeling.san import build_san_model
from cat_seg.modeling.san.criterion import SetCriterion

SAN_CONFIGS = REPO_ROOT / "catseg" / "configs" / "san"
SAN_TINY = SAN_CONFIGS / "san_tiny.yaml"
NUM_CLASSES = 19  # cs19.json in san_tiny.yaml
NUM_QUERIES = 10  # san_tiny_model.yaml
PREFIXES = (
    "criterion.",
    "side_adapter_network.",
    "clip_visual_extractor.",
    "clip_rec_head.",
    "ov_classifier.",
)
# CAT-Seg's own members, optional in the protocol (its head, its decoder-guidance blocks).
CATSEG_ONLY = ("sem_seg_head", "guidance_layers", "train_guidance_layers")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and the machine is shared (see engine_testlib.single_thread)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_san_tiny(seed: int = 0, opts: tuple[str, ...] = (), *, class_names: bool = True) -> SAN:
    torch.manual_seed(seed)
    return build_model(load_config(SAN_TINY, list(opts)), "cpu", class_names=class_names)


def images(sizes, seed: int = 0, *, labels: bool = False) -> list[dict]:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        item = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
        if labels:
            item["sem_seg"] = torch.randint(0, NUM_CLASSES, (h, w), generator=g)
        out.append(item)
    return out


def predict(model: nn.Module, inputs: list[dict], text: torch.Tensor | None = None) -> list[torch.Tensor]:
    with torch.no_grad():
        return [o["sem_seg"] for o in model(inputs, text_features=text)]


@pytest.fixture(scope="module")
def san() -> SAN:
    return build_san_tiny()


# --------------------------------------------------------------------------------------------------
# Registry and interface
# --------------------------------------------------------------------------------------------------


def test_san_is_registered_and_built_through_build_model(san: SAN) -> None:
    assert MODEL_REGISTRY["SAN"] is build_san_model
    assert type(san) is SAN
    fresh = build_san_tiny()
    assert fresh.training, "builders return the model in training mode"
    assert san.train_class_names == san.test_class_names and len(san.test_class_names) == NUM_CLASSES
    assert san.class_tokens.shape[:2] == (NUM_CLASSES, len(san.templates)) == (NUM_CLASSES, 14)  # vild
    assert san.clip_pixel_mean.shape == san.clip_pixel_std.shape == (3, 1, 1)
    assert san.clip_resolution == san.clip_model.visual.image_size == 32
    # The whole CLIP is the one the three SAN modules are made of (no copies).
    assert san.clip_model.visual.transformer.resblocks[0] is san.clip_visual_extractor.resblocks[0]
    assert san.clip_model.visual.transformer.resblocks[2] is san.clip_rec_head.resblocks[0]
    assert san.clip_model.transformer is san.ov_classifier.transformer
    own = {id(t) for t in [*san.parameters(), *san.buffers()]}
    assert all(id(t) in own for t in [*san.clip_model.parameters(), *san.clip_model.buffers()])


def test_san_is_a_segmentation_model_without_the_catseg_only_members(san: SAN) -> None:
    assert isinstance(san, SegmentationModel)
    members = [m for m in dir(SegmentationModel) if not m.startswith("_") or m == "__call__"]
    assert all(hasattr(san, m) for m in members)
    # CAT-Seg's optional members are absent, so the original CAT-Seg trainer's mode is refused.
    assert not any(hasattr(san, m) for m in CATSEG_ONLY)
    from cat_seg.engine.lora import attach_lora

    cfg = load_config(SAN_TINY, ["MODEL.LORA.NAME", "dom", "MODEL.LORA.REFERENCE_TRAINING", "True"])
    with pytest.raises(ValueError, match=r"REFERENCE_TRAINING.*does not\s+apply to SAN"):
        attach_lora(build_san_tiny(), cfg)


def test_eval_forward_gives_one_score_map_per_image_at_the_requested_size(san: SAN) -> None:
    san.eval()
    inputs = images([(50, 70), (41, 33)])
    inputs[1]["height"], inputs[1]["width"] = 90, 60
    outputs = predict(san, inputs)
    assert [o.shape for o in outputs] == [(NUM_CLASSES, 50, 70), (NUM_CLASSES, 90, 60)]
    for o in outputs:
        assert torch.isfinite(o).all() and o.min() >= 0
        # sum over queries of p(class) * p(mask): the class probabilities of a query sum to <= 1
        assert o.sum(0).max() <= NUM_QUERIES
    assert outputs[0].std() > 0


def test_per_image_text_features_equal_shared_ones_when_the_rows_are_equal(san: SAN) -> None:
    san.eval()
    inputs = images([(40, 40), (50, 70)])
    with torch.no_grad():
        text = san.text_features()
    assert text.shape == (NUM_CLASSES, 14, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(NUM_CLASSES, 14))
    shared = predict(san, inputs, text)
    per_image = predict(san, inputs, text.expand(2, -1, -1, -1))
    implicit = predict(san, inputs)
    for a, b, c in zip(shared, per_image, implicit):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_per_image_text_features_apply_to_their_own_image(san: SAN) -> None:
    san.eval()
    inputs = images([(50, 70), (60, 90)])  # both pad to 64 x 96: a batch computes what each image alone does
    with torch.no_grad():
        text = san.text_features()
    other = torch.nn.functional.normalize(text + 0.3 * torch.randn_like(text), dim=-1)
    batched = predict(san, inputs, torch.stack([text, other]))
    alone = [predict(san, [inputs[0]], text)[0], predict(san, [inputs[1]], other)[0]]
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (alone[1] - predict(san, [inputs[1]], text)[0]).abs().max() > 1e-3, "the text must matter"
    with pytest.raises(ValueError, match="given for 3 images, but the batch has 2"):
        predict(san, inputs, text.expand(3, -1, -1, -1))


def test_vocabularies(san: SAN) -> None:
    model = build_san_tiny(class_names=False).eval()
    with pytest.raises(RuntimeError, match="no class names set"):
        model.text_features()
    model.set_class_names(train=["road", "sky"], test=["road", "sky", "car"])
    assert model.class_tokens.shape[0] == 3 and model.train().class_tokens.shape[0] == 2
    model.eval()
    assert predict(model, images([(40, 56)]))[0].shape == (3, 40, 56)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("MODEL.SIDE_ADAPTER.VIT_NAME", "vit_base_patch16", r"MODEL\.SIDE_ADAPTER\.VIT_NAME"),
        ("MODEL.SIDE_ADAPTER.VIT_NAME", "vit_w30n4d3_patch8", r"MODEL\.SIDE_ADAPTER\.VIT_NAME"),
        ("MODEL.SIDE_ADAPTER.FUSION_MAP", "['0-0', '1->1']", r"MODEL\.SIDE_ADAPTER\.FUSION_MAP"),
        ("MODEL.SIDE_ADAPTER.FUSION_MAP", "['0->0', '5->1']", r"MODEL\.SIDE_ADAPTER\.FUSION_MAP"),
        ("MODEL.SAN.CLIP_MODEL_NAME", "ViT-H-14", r"MODEL\.SAN\.CLIP_MODEL_NAME"),
    ],
)
def test_bad_san_config_values_are_refused_naming_the_key(key: str, value: str, message: str) -> None:
    cfg = load_config(SAN_TINY, [key, value])
    with pytest.raises(ValueError, match=message):
        build_model(cfg, "cpu", class_names=False)


@pytest.mark.parametrize("fusion_map", ["['0->0', '1->7']", "['0->1', '2->1']"])
def test_a_fusion_map_beyond_the_side_vit_or_repeating_a_block_is_refused(fusion_map: str) -> None:
    cfg = load_config(SAN_TINY, ["MODEL.SIDE_ADAPTER.FUSION_MAP", fusion_map])
    with pytest.raises(ValueError, match=r"MODEL\.SIDE_ADAPTER\.FUSION_MAP"):
        build_model(cfg, "cpu", class_names=False)


# --------------------------------------------------------------------------------------------------
# State dict: the original SAN names
# --------------------------------------------------------------------------------------------------


def _attentions(model: nn.Module) -> dict[str, Attention]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


def test_state_dict_uses_the_original_names_with_packed_attention(san: SAN) -> None:
    state = san.state_dict()
    assert all(k.startswith(PREFIXES) for k in state), [k for k in state if not k.startswith(PREFIXES)]
    assert {k.split(".")[0] + "." for k in state} == set(PREFIXES)
    assert not [k for k in state if any(f"{w}_proj" in k for w in "qkv")]
    attentions = _attentions(san)
    assert len(attentions) == 3 + 2  # visual (extractor 2 + recognition 1) and text blocks
    for name, attn in attentions.items():
        packed = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        assert torch.equal(state[f"{name}.in_proj_weight"], packed), name
        assert torch.equal(state[f"{name}.in_proj_bias"], attn.in_proj_bias), name
    packed_keys = sorted(k for k in state if k.endswith("attn.in_proj_weight"))
    assert packed_keys == sorted(f"{n}.in_proj_weight" for n in attentions)


def test_state_dict_round_trip_through_a_file_on_a_fresh_model(san: SAN, tmp_path: Path) -> None:
    san.eval()
    inputs = images([(50, 70)])
    expected = predict(san, inputs)[0]
    torch.save({"model": san.state_dict()}, tmp_path / "san.pth")
    fresh = build_san_tiny(seed=1).eval()
    assert (predict(fresh, inputs)[0] - expected).abs().max() > 1e-3, "the seeds must give other weights"
    state = torch.load(tmp_path / "san.pth", weights_only=True)["model"]
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(predict(fresh, inputs)[0], expected)
    after = fresh.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_packed_attention_weights_load_onto_the_split_linear_modules(san: SAN) -> None:
    state = {k: v.clone() for k, v in san.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    packed = {}
    for key in [k for k in state if k.endswith("attn.in_proj_weight")]:
        state[key] = packed[key] = torch.randn(state[key].shape, generator=g)
    fresh = build_san_tiny(seed=1)
    fresh.load_state_dict(state, strict=True)
    for name, attn in _attentions(fresh).items():
        q, k, v = packed[f"{name}.in_proj_weight"].chunk(3)
        assert torch.equal(attn.q_proj.weight, q) and torch.equal(attn.k_proj.weight, k), name
        assert torch.equal(attn.v_proj.weight, v), name
    # The whole CLIP sees them too (its blocks are the same modules).
    q_text = packed["ov_classifier.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)[0]
    assert torch.equal(fresh.clip_model.transformer.resblocks[1].attn.q_proj.weight, q_text)


ORIGINAL_STATE_DICTS = {
    "san_vitb16.yaml": "san_vitb16_state_dict.json",
    "san_vitl14_336.yaml": "san_vitl14_state_dict.json",
}


def _original(fixture: str) -> dict:
    path = FIXTURES / fixture
    if not path.is_file():
        pytest.skip(f"tests/fixtures/{fixture} is missing (it is generated from the original SAN code)")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data.get("source"), "the fixture must say where it comes from"
    return data


def _original_keys(fixture: str) -> list[tuple[str, tuple[int, ...]]]:
    data = _original(fixture)
    keys = [(name, tuple(shape)) for name, shape in data["keys"]]
    assert len(keys) == data.get("num_keys", len(keys))
    return keys


def _meta_model(config: str) -> SAN:
    return build_model(load_config(SAN_CONFIGS / config), "meta", class_names=False)


def _meta_keys(config: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in _meta_model(config).state_dict().items()]


@pytest.mark.parametrize("config", sorted(ORIGINAL_STATE_DICTS))
def test_state_dict_names_and_shapes_equal_the_original(config: str) -> None:
    original = _original_keys(ORIGINAL_STATE_DICTS[config])
    ours = _meta_keys(config)
    assert len(set(original)) == len(original) and len(set(ours)) == len(ours)
    missing, extra = sorted(set(original) - set(ours)), sorted(set(ours) - set(original))
    assert not missing and not extra, f"missing {missing[:10]}, not in the original {extra[:10]}"


# Inside a CLIP block, open_clip (the original) registers ln_1, attn, ln_2, mlp; the project's CLIP block (shared
# with CAT-Seg, whose released state dict lists attn, ln_1, mlp, ln_2) keeps the OpenAI order. Loading is by
# name, so only the listing differs.
_OPEN_CLIP_BLOCK_ORDER = {"ln_1": 0, "attn": 1, "ln_2": 2, "mlp": 3}


def _open_clip_block_order(names: list[str]) -> list[str]:
    """``names`` with each CLIP block's tensors in open_clip's order (everything else where it is)."""
    out, block, pending = [], None, []
    for name in [*names, ""]:
        head, sep, tail = name.partition(".resblocks.")
        key = f"{head}.{tail.split('.')[0]}" if sep else None
        if key != block and pending:
            out += sorted(
                pending, key=lambda n: _OPEN_CLIP_BLOCK_ORDER[n.split(".resblocks.")[1].split(".")[1]]
            )
            pending = []
        block = key
        if key is not None:
            pending.append(name)
        elif name:
            out.append(name)
    return out


@pytest.mark.parametrize("config", sorted(ORIGINAL_STATE_DICTS))
def test_state_dict_order_equals_the_original_but_inside_clip_blocks(config: str) -> None:
    """The modules are registered in the original's order (model.py); only the tensors inside each CLIP
    block are listed in another order (attn, ln_1, mlp, ln_2 instead of ln_1, attn, ln_2, mlp)."""
    original = [name for name, _ in _original_keys(ORIGINAL_STATE_DICTS[config])]
    ours = [name for name, _ in _meta_keys(config)]
    assert _open_clip_block_order(original) == original
    reordered = _open_clip_block_order(ours)
    first = next((i for i, (a, b) in enumerate(zip(original, reordered)) if a != b), None)
    assert first is None, (
        f"first difference at {first}: original {original[first]!r}, ours {reordered[first]!r}"
    )


@pytest.mark.parametrize("config", sorted(ORIGINAL_STATE_DICTS))
def test_buffers_are_the_original_ones(config: str) -> None:
    """The state dict's tensors that are not parameters, and the buffers it leaves out, as the original."""
    data = _original(ORIGINAL_STATE_DICTS[config])
    model = _meta_model(config)
    # (the packed q/k/v ``attn.in_proj_weight`` holds parameters too)
    parameters = {name for name, _ in model.named_parameters()}
    state = model.state_dict()
    parameters |= {k for k in state if k.endswith(".attn.in_proj_weight")}
    buffers = {k: list(v.shape) for k, v in state.items() if k not in parameters}
    assert buffers == data["state_dict_non_parameter_keys"]
    left_out = {k: list(v.shape) for k, v in model.named_buffers() if k not in state}
    assert left_out == data["non_persistent_buffers_not_in_state_dict"] | {
        "train_tokens": [0, 1, 77],  # ours: the vocabularies' prompt tokens (none set here)
        "test_tokens": [0, 1, 77],
    }


# --------------------------------------------------------------------------------------------------
# LoRA targets
# --------------------------------------------------------------------------------------------------

# config -> (CLIP visual blocks, blocks of the extractor, text blocks, side ViT blocks, query MLP layers)
DEPTHS = {
    "san_tiny.yaml": (3, 2, 2, 3, 3),
    "san_vitb16.yaml": (12, 9, 12, 8, 3),
    "san_vitl14_336.yaml": (24, 18, 12, 8, 3),
}


def _expected_targets(visual: int, split: int, text: int, side: int, mlp: int) -> set[str]:
    clip = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.c_fc", "mlp.c_proj")
    names = {f"clip_visual_extractor.resblocks.{i}.{m}" for i in range(split) for m in clip}
    names |= {f"clip_rec_head.resblocks.{i}.{m}" for i in range(visual - split) for m in clip}
    names |= {f"ov_classifier.transformer.resblocks.{i}.{m}" for i in range(text) for m in clip}
    side_linears = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    names |= {f"side_adapter_network.vit_model.blocks.{i}.{m}" for i in range(side) for m in side_linears}
    names |= {f"side_adapter_network.mask_decoder.query_mlp.layers.{i}" for i in range(mlp)}
    return names


@pytest.mark.parametrize("config", sorted(DEPTHS))
def test_lora_targets_are_the_clip_side_vit_and_query_mlp_linears(config: str) -> None:
    model = build_model(load_config(SAN_CONFIGS / config), "meta", class_names=False)
    targets = model.lora_target_modules()
    expected = _expected_targets(*DEPTHS[config])
    assert len(targets) == len(set(targets)) == len(expected)
    assert set(targets) == expected
    modules = dict(model.named_modules())
    assert all(type(modules[name]) is nn.Linear for name in targets)
    assert semla_target_modules(model) == targets
    assert resolve_target_modules([], model) == targets
    # Nothing else: the Linear layers left out are the attention outputs and the bias scaling.
    others = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - set(targets)
    assert {n.rsplit(".", 1)[-1] for n in others} <= {"out_proj", "bias_scaling"}


def test_every_lora_target_takes_part_in_the_prediction(san: SAN) -> None:
    """A LoRA on a module the forward never calls would be inert (CAT-Seg's q/k/v: docs/differences.md)."""
    san.eval()
    called: set[str] = set()
    modules = dict(san.named_modules())
    hooks = [
        modules[name].register_forward_hook(lambda *_, _n=name: called.add(_n))
        for name in san.lora_target_modules()
    ]
    try:
        predict(san, images([(40, 56)]))
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(set(san.lora_target_modules()) - called) == []


# --------------------------------------------------------------------------------------------------
# Training with LoRA
# --------------------------------------------------------------------------------------------------

LOSS_KEYS = {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
ADAPTER = "dom"


def _lora_cfg():  # noqa: ANN202 - CfgNode
    return load_config(SAN_TINY, ["MODEL.LORA.NAME", ADAPTER])


def _one_step(model: nn.Module, cfg) -> dict[str, float]:  # noqa: ANN001
    """What the engine's Trainer does in one fp32 step: forward, backward, full-model clipping, AdamW."""
    from cat_seg.engine.optim import build_gradient_clipper, build_optimizer

    optimizer, _ = build_optimizer(cfg, model)
    clipper = build_gradient_clipper(cfg)
    model.train()
    torch.manual_seed(123)  # the criterion's point sampling
    losses = model(images([(32, 32), (32, 48)], seed=4, labels=True))
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    if clipper is not None:
        clipper([p for group in optimizer.param_groups for p in group["params"]])
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def test_one_lora_step_changes_only_the_lora_parameters() -> None:
    from cat_seg.engine.lora import attach_lora, trainable_state_dict

    cfg = _lora_cfg()
    adapted = attach_lora(build_san_tiny(), cfg)
    trainable = trainable_state_dict(adapted)
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    assert len(trainable) == 2 * len(_expected_targets(*DEPTHS["san_tiny.yaml"]))
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    losses = _one_step(adapted, cfg)
    assert set(losses) == LOSS_KEYS and all(math.isfinite(v) and v > 0 for v in losses.values())
    after = adapted.state_dict()
    assert list(after) == list(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(".lora_" in k for k in changed), sorted(k for k in changed if ".lora_" not in k)[:5]
    lora_b = {k for k in before if ".lora_B." in k}
    assert lora_b and lora_b <= changed, sorted(lora_b - changed)[:5]  # every target is in the loss


def test_native_lora_step_equals_peft_step() -> None:
    from peft import get_peft_model

    from cat_seg.engine.lora import attach_lora, lora_config_from_cfg, trainable_state_dict

    cfg = _lora_cfg()
    base, model = build_san_tiny(), build_san_tiny()
    torch.manual_seed(7)  # the same random stream draws A on each side
    native = attach_lora(base, cfg)
    targets = resolve_target_modules([], model)
    torch.manual_seed(7)
    oracle = get_peft_model(model, lora_config_from_cfg(cfg, targets), adapter_name=ADAPTER)
    assert list(native.state_dict()) == list(oracle.state_dict())
    for key, value in oracle.state_dict().items():
        assert torch.equal(native.state_dict()[key], value), key
    native_losses, oracle_losses = _one_step(native, cfg), _one_step(oracle, cfg)
    assert native_losses == pytest.approx(oracle_losses, abs=1e-5)
    ours, theirs = trainable_state_dict(native), trainable_state_dict(oracle)
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in ours.items() if ".lora_B." in k)


def test_images_that_are_all_ignore_train_without_error() -> None:
    model = build_san_tiny().train()
    batch = images([(32, 32), (32, 32)], seed=2, labels=True)
    batch[0]["sem_seg"] = torch.full((32, 32), 255)
    only_ignore = model(batch[:1])
    assert set(only_ignore) == LOSS_KEYS
    assert all(float(only_ignore[k].detach()) == 0 for k in LOSS_KEYS if not k.startswith("loss_ce"))
    mixed = model(batch)
    total = sum(only_ignore.values()) + sum(mixed.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------------------
# The criterion against a hand computation
# --------------------------------------------------------------------------------------------------


def _bilinear(image: np.ndarray, x: float, y: float) -> float:
    """``grid_sample(align_corners=False)`` with zero padding of an (H, W) map at normalised (x, y)."""
    h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    total = 0.0
    for dx, wx in ((0, 1 - fx), (1, fx)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            xi, yi = x0 + dx, y0 + dy
            if 0 <= xi < w and 0 <= yi < h:
                total += wx * wy * float(image[yi, xi])
    return total


def _sample(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.array([_bilinear(image, float(x), float(y)) for x, y in points])


def _bce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, logits) - logits * targets


def _dice(logits: np.ndarray, targets: np.ndarray) -> float:
    probs = 1 / (1 + np.exp(-logits))
    return 1 - (2 * (probs * targets).sum() + 1) / (probs.sum() + targets.sum() + 1)


def _softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


WEIGHTS = {"class": 2.0, "mask": 5.0, "dice": 5.0}
POINTS = 16


def _criterion(num_classes: int) -> SetCriterion:
    return SetCriterion(
        num_classes=num_classes,
        eos_coef=0.1,
        class_weight=WEIGHTS["class"],
        mask_weight=WEIGHTS["mask"],
        dice_weight=WEIGHTS["dice"],
        num_points=POINTS,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )


def _brute_force_assignment(logits, masks, target_labels, target_masks, points) -> list[tuple[int, int]]:  # noqa: ANN001
    """The (query, target) pairs of least total matching cost over every assignment, sorted by query."""
    q, m = logits.shape[0], len(target_labels)
    cost = np.zeros((q, m))
    for i in range(q):
        out = _sample(masks[i], points)
        probs = _softmax(logits[i])
        for j in range(m):
            tgt = _sample(target_masks[j], points)
            cost[i, j] = (
                WEIGHTS["mask"] * _bce(out, tgt).mean()
                - WEIGHTS["class"] * probs[target_labels[j]]
                + WEIGHTS["dice"] * _dice(out, tgt)
            )
    totals = {perm: sum(cost[perm[j], j] for j in range(m)) for perm in itertools.permutations(range(q), m)}
    best = min(totals, key=totals.get)
    runner_up = sorted(totals.values())[1]
    assert runner_up - totals[best] > 1e-4, "the toy needs a unique optimum"
    return sorted((best[j], j) for j in range(m))


def _toy(seed: int | None = None):  # noqa: ANN202
    """1 image, 3 queries, 3 classes + no-object, 2 targets (8x8); masks predicted at 4x4.

    Without a seed: target 0 (class 2) is the left half, target 1 (class 0) the right half; query 2
    predicts the left half as class 2, query 0 the right half as class 0, query 1 no object.
    """
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    noise = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    if seed is None:
        left = torch.tensor([2.0, 2.0, -2.0, -2.0], dtype=torch.float64).expand(4, 4)
        masks = torch.stack([-left, torch.zeros(4, 4), left]) + 0.5 * noise
        logits = torch.tensor([[3.0, 0, 0, 0], [0, 0, 0, 2.0], [0, 0, 3.0, 0]], dtype=torch.float64)
        labels = torch.tensor([2, 0])
        target = torch.zeros(2, 8, 8)
        target[0, :, :4] = 1
        target[1, :, 4:] = 1
    else:
        masks = 2 * noise
        logits = 2 * torch.randn(3, 4, generator=g, dtype=torch.float64)
        labels = torch.randperm(3, generator=g)[:2]
        target = (torch.rand(2, 8, 8, generator=g) > 0.5).float()
    return logits[None].float(), masks[None].float(), [{"labels": labels, "masks": target}]


@pytest.mark.parametrize("seed", [None, *range(1, 11)])
def test_matcher_finds_the_least_cost_assignment_of_a_brute_force(seed: int | None) -> None:
    logits, masks, targets = _toy(seed)
    torch.manual_seed(11)
    points = torch.rand(1, POINTS, 2)[0].double().numpy()  # the matcher draws its points first
    torch.manual_seed(11)
    ((rows, cols),) = _criterion(3).matcher(logits, masks, targets)
    expected = _brute_force_assignment(
        logits[0].double().numpy(),
        masks[0].double().numpy(),
        targets[0]["labels"].tolist(),
        targets[0]["masks"].double().numpy(),
        points,
    )
    assert list(zip(rows.tolist(), cols.tolist())) == expected
    if seed is None:
        assert expected == [(0, 1), (2, 0)]  # what the toy was built to give


def test_random_toys_are_not_all_matched_alike() -> None:
    """The brute-force test above must be able to tell assignments apart."""
    found = set()
    for seed in range(1, 11):
        logits, masks, targets = _toy(seed)
        torch.manual_seed(11)
        ((rows, cols),) = _criterion(3).matcher(logits, masks, targets)
        found.add(tuple(zip(rows.tolist(), cols.tolist())))
    assert len(found) >= 3


@pytest.mark.parametrize("num_classes", [3, 171])  # the empty_weight buffer, or weights made for T classes
def test_losses_equal_a_hand_computation(num_classes: int) -> None:
    logits, masks, targets = _toy()
    torch.manual_seed(5)
    matcher_points = torch.rand(1, POINTS, 2)[0].double().numpy()
    candidates = torch.rand(2, 3 * POINTS, 2).double().numpy()  # per matched mask: PointRend candidates
    uniform = torch.rand(2, POINTS - 12, 2).double().numpy()  # and its uniform points (25 %)
    torch.manual_seed(5)
    losses = _criterion(num_classes)([logits], [masks], targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}

    lg, mk = logits[0].double().numpy(), masks[0].double().numpy()
    tg, labels = targets[0]["masks"].double().numpy(), targets[0]["labels"].tolist()
    pairs = _brute_force_assignment(lg, mk, labels, tg, matcher_points)
    assert pairs == [(0, 1), (2, 0)]
    # Cross-entropy over the 3 queries, unmatched = no object (class 3) with weight 0.1; weighted mean.
    query_labels = [3, 3, 3]
    for q, j in pairs:
        query_labels[q] = labels[j]
    class_weights = [1.0, 1.0, 1.0, 0.1]
    nll = [-math.log(_softmax(lg[q])[query_labels[q]]) for q in range(3)]
    ce = sum(class_weights[query_labels[q]] * nll[q] for q in range(3)) / sum(
        class_weights[label] for label in query_labels
    )
    # Mask BCE and Dice on 16 points per matched mask: the 12 least certain of 48 candidates + 4 uniform.
    bce, dice = 0.0, 0.0
    for n, (q, j) in enumerate(pairs):
        uncertainty = -np.abs(_sample(mk[q], candidates[n]))
        chosen = candidates[n][np.argsort(-uncertainty, kind="stable")[:12]]
        points = np.concatenate([chosen, uniform[n]])
        out, tgt = _sample(mk[q], points), _sample(tg[j], points)
        bce += _bce(out, tgt).mean()
        dice += _dice(out, tgt)
    num_masks = 2
    expected = {
        "loss_ce": WEIGHTS["class"] * ce,
        "loss_mask": WEIGHTS["mask"] * bce / num_masks,
        "loss_dice": WEIGHTS["dice"] * dice / num_masks,
    }
    for key, value in expected.items():
        assert float(losses[key]) == pytest.approx(value, rel=1e-5), key


def test_an_image_without_targets_is_all_no_object() -> None:
    logits, masks, _ = _toy()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)}]
    losses = _criterion(3)([logits], [masks], empty)
    lg = logits[0].double().numpy()
    # every query's target is "no object"; the 0.1 weights cancel in the weighted mean
    expected = WEIGHTS["class"] * np.mean([-math.log(_softmax(row)[3]) for row in lg])
    assert float(losses["loss_ce"]) == pytest.approx(expected, rel=1e-6)
    assert float(losses["loss_mask"]) == 0 and float(losses["loss_dice"]) == 0


def test_auxiliary_outputs_get_the_same_losses_with_an_index() -> None:
    """``criterion([aux, final])`` = the final block's losses, then the auxiliary block's as ``<name>_0``
    (drawn in that order from the random stream, as the original)."""
    logits, masks, targets = _toy()
    aux_logits, aux_masks, _ = _toy(9)
    criterion = _criterion(3)
    torch.manual_seed(5)
    both = criterion([aux_logits, logits], [aux_masks, masks], targets)
    torch.manual_seed(5)
    final = criterion([logits], [masks], targets)
    aux = criterion([aux_logits], [aux_masks], targets)
    assert set(both) == LOSS_KEYS
    for key in ("loss_ce", "loss_mask", "loss_dice"):
        assert torch.equal(both[key], final[key]) and torch.equal(both[f"{key}_0"], aux[key]), key
    assert not torch.equal(final["loss_ce"], aux["loss_ce"])


# --------------------------------------------------------------------------------------------------
# The fused multi-adapter forward against PEFT
# --------------------------------------------------------------------------------------------------

NAMES = ["rain", "fog", "night"]
RANKS = [2, 4, 3]
ALPHAS = [4.0, 8.0, 1.5]


@pytest.fixture(scope="module")
def fusion_setup(tmp_path_factory):  # noqa: ANN001, ANN201
    from peft import PeftModel

    from domain_orchestrator.library import AdapterLibrary
    from domain_orchestrator.synthetic import linear_shapes, write_random_adapter

    root = tmp_path_factory.mktemp("san_loradb")
    model = build_san_tiny(seed=0).eval()
    shapes = linear_shapes(model, model.lora_target_modules())
    for i, name in enumerate(NAMES):
        write_random_adapter(root / name, shapes, rank=RANKS[i], alpha=ALPHAS[i], seed=i, std=0.1)
    library = AdapterLibrary.open(root, NAMES, model=model)
    assert set(library.layers) == set(model.lora_target_modules())
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), root / NAMES[0], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        peft_model.load_adapter(root / name, adapter_name=name)
    peft_model.eval()
    # PEFT wrapped the modules the whole CLIP is made of (the text tower encodes through them).
    wrapped = peft_model.get_base_model().clip_model.transformer.resblocks[0].attn.q_proj
    assert hasattr(wrapped, "lora_A") and set(wrapped.lora_A) == set(NAMES)
    return model, library, peft_model


def _peft_fused(peft_model, weights: list[float], inputs: list[dict]) -> list[torch.Tensor]:  # noqa: ANN001
    """The oracle: PEFT's weighted "cat" merge of the adapters in use, activated, one forward."""
    active = [(n, w) for n, w in zip(NAMES, weights) if w != 0]
    peft_model.add_weighted_adapter(
        [n for n, _ in active], [w for _, w in active], "fused", combination_type="cat"
    )
    peft_model.set_adapter("fused")
    try:
        return predict(peft_model.get_base_model(), inputs)
    finally:
        peft_model.set_adapter(NAMES[0])
        peft_model.delete_adapter("fused")


def _ours(model, library, weights, inputs, mode: str = "auto") -> list[torch.Tensor]:  # noqa: ANN001
    from domain_orchestrator.fusion import fused_adapters, fused_text_features

    weights = torch.tensor(weights, dtype=torch.float64)
    with torch.no_grad():
        text = fused_text_features(model, library, weights, mode=mode)  # (B, T, P, C)
        assert text.shape == (len(inputs), NUM_CLASSES, 14, 32)
        with fused_adapters(model, library, weights, mode=mode):
            return predict(model, inputs, text)


@pytest.mark.parametrize("mode", ["auto", "merged", "unmerged"])
def test_fused_forward_equals_peft_cat(fusion_setup, mode: str) -> None:  # noqa: ANN001
    model, library, peft_model = fusion_setup
    inputs = images([(50, 70)], seed=1)
    weights = [0.2, 0.5, 0.3]
    expected = _peft_fused(peft_model, weights, inputs)[0]
    got = _ours(model, library, [weights], inputs, mode)[0]
    assert (expected - predict(model, inputs)[0]).abs().max() > 1e-2, "the adapters must change the output"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_images_with_their_own_weights_in_one_batch_equal_separate_peft_runs(fusion_setup) -> None:  # noqa: ANN001
    model, library, peft_model = fusion_setup
    inputs = images([(50, 70), (60, 90)], seed=2)  # same padded size: one batch = each image alone
    weights = [[0.0, 0.7, 0.3], [1.0, 0.0, 0.0]]
    got = _ours(model, library, weights, inputs)
    expected = [_peft_fused(peft_model, w, [x])[0] for w, x in zip(weights, inputs)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (expected[0] - _peft_fused(peft_model, weights[1], [inputs[0]])[0]).abs().max() > 1e-2


def test_zero_weights_equal_the_base_model_exactly_and_leave_it_unchanged(fusion_setup) -> None:  # noqa: ANN001
    model, library, _ = fusion_setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = images([(40, 40), (40, 40)], seed=3)
    for a, b in zip(_ours(model, library, [[0.0] * 3, [0.0] * 3], inputs), predict(model, inputs)):
        assert torch.equal(a, b)
    _ours(model, library, [[0.1, 0.2, 0.7]], inputs[:1])
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_the_orchestrator_tells_san_architectures_apart() -> None:
    from domain_orchestrator.plan import architecture_key

    tiny = architecture_key(load_config(SAN_TINY))
    assert tiny == architecture_key(
        load_config(SAN_TINY, ["MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", "datasets/ade150.json"])
    )  # class names aside
    assert tiny != architecture_key(load_config(SAN_TINY, ["MODEL.SIDE_ADAPTER.NUM_QUERIES", "12"]))
    assert tiny != architecture_key(load_config(SAN_TINY, ["MODEL.SAN.CLIP_RESOLUTION", "0.75"]))
    catseg_tiny = load_config(resolve_catseg_path("configs/tiny/tiny.yaml"))
    assert tiny != architecture_key(catseg_tiny)
