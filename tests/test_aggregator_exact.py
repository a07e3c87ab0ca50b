"""The aggregator computes exactly what CAT-Seg's padded computation computes.

The oracle is ``cat_seg.modeling._padded``: the original code's aggregator, whose class attention pads
the class axis to ``pad_len`` with materialised copies of a learnt token and guidance. The model computes
the same from the real classes plus one padding class of multiplicity m = pad_len - T, broadcasts shared
guidance instead of repeating it, and runs its independent rows in chunks. Compared here: probabilities
(float32, CPU) within 1e-5, and the gradient of every trainable parameter within 1e-5 relative (in float64:
some float32 gradients carry ~5e-4 relative rounding error in *both* computations, measured against float64,
so a float32 comparison would test rounding, not the computation), for 19 / 150 / 300 classes (padding of 13 or 237 / 106 classes, and the top-``pad_len`` path), batch 1 and 3,
whole-image and sliding-window, linear and full attention, and a non-zero learnt padding token and guidance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from helpers import build_tiny, random_inputs

from cat_seg.config import CATSEG_ROOT, load_config, resolve_catseg_path
from cat_seg.modeling import aggregator as agg
from cat_seg.modeling import build_model
from cat_seg.modeling._padded import (
    full_attention_padded,
    linear_attention_padded,
    padded_computation,
    up_copying,
    window_merge,
)
from cat_seg.modeling.aggregator import (
    Aggregator,
    ClassTransformerLayer,
    Up,
    full_attention,
    linear_attention,
    upsample_2x,
    window_order,
    window_partition,
)
from cat_seg.modeling.build import model_kwargs_from_cfg
from cat_seg.modeling.text import load_class_names

CLASS_COUNTS = (19, 150, 300)
VITB_CONFIG = CATSEG_ROOT / "configs" / "vitb_384.yaml"


def class_names(count: int) -> list[str]:
    """Real vocabularies: Cityscapes (19), ADE-150, the first 300 of ADE-847."""
    files = {19: "datasets/cs19.json", 150: "datasets/ade150.json", 300: "datasets/ade847.json"}
    return load_class_names(resolve_catseg_path(files[count]))[:count]


def nonzero_padding(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every class-attention layer a random learnt padding token and guidance (zeros at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, ClassTransformerLayer):
                assert m.padding_tokens is not None and m.padding_guidance is not None
                m.padding_tokens.copy_(torch.randn(m.padding_tokens.shape, generator=g))
                m.padding_guidance.copy_(torch.randn(m.padding_guidance.shape, generator=g))


def assert_gradients_close(model: torch.nn.Module, reference: dict[str, torch.Tensor | None]) -> None:
    """Every trainable parameter's gradient equals the reference within 1e-5 relative (in norm).

    Gradients that are zero in exact arithmetic come out as float32 rounding noise (the key biases of
    softmax attention: they shift every logit of a query alike; ~1e-11 against a largest gradient ~1) and
    have no relative scale: where the reference is below 1e-7 of the largest gradient, the gradient must be
    too. Parameters that no computation reaches (the dense last CLIP block's query) have none in both.
    """
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == reference.keys()
    noise = 1e-7 * max(g.norm() for g in reference.values() if g is not None)
    for name, ref in reference.items():
        got = grads[name]
        if ref is None:
            assert got is None, name
            continue
        assert got is not None, name
        if ref.norm() < noise:
            assert got.norm() < noise, f"{name}: gradient {got.norm():.2e} where the reference is ~0"
            continue
        error = (got - ref).norm() / ref.norm()
        assert error <= 1e-5, f"{name}: relative gradient error {error:.2e}"


def trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        n: (p.grad.clone() if p.grad is not None else None)
        for n, p in model.named_parameters()
        if p.requires_grad
    }


# -- the parts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("multiplicity", [0, 1, 237])
@pytest.mark.parametrize("kind", ["linear", "full"])
def test_padding_of_multiplicity_m_equals_m_appended_copies(kind: str, multiplicity: int) -> None:
    g = torch.Generator().manual_seed(multiplicity)
    n, s, length, heads, dim = 2, 5, 3, 2, 4
    q, k, v = (torch.randn(n, s, length, heads, dim, generator=g) for _ in range(3))
    pad_k, pad_v = torch.randn(n, heads, dim, generator=g), torch.randn(n, heads, dim, generator=g)
    got = (linear_attention if kind == "linear" else full_attention)(
        q, k, v, pad_k=pad_k, pad_v=pad_v, multiplicity=multiplicity
    )
    # Oracle: the padded sequence itself, one position at a time, with the original functions.
    copies = lambda t: t[:, None, None].expand(n, multiplicity, length, heads, dim)  # noqa: E731
    k_all, v_all = torch.cat([k, copies(pad_k)], dim=1), torch.cat([v, copies(pad_v)], dim=1)
    attend = linear_attention_padded if kind == "linear" else full_attention_padded
    expected = torch.stack(
        [attend(q[:, :, i], k_all[:, :, i], v_all[:, :, i]) for i in range(length)], dim=2
    )  # (N, S, L, H, D)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [0, 2])
def test_window_order_is_roll_then_partition(shift: int) -> None:
    x = torch.randn(2, 8, 12, 3)  # (B, H, W, C)
    expected = window_partition(torch.roll(x, shifts=(-shift, -shift), dims=(1, 2)), 4)  # (B*nW, 16, C)
    order = window_order(8, 12, 4, shift)
    got = rearrange(x, "b h w c -> b (h w) c")[:, order]
    torch.testing.assert_close(rearrange(got, "b (w n) c -> (b w) n c", n=16), expected, rtol=0, atol=0)
    back = window_merge(expected, 4, 8, 12)
    assert torch.equal(torch.roll(back, shifts=(shift, shift), dims=(1, 2)), x)


def test_upsample_2x_is_the_transposed_convolution() -> None:
    torch.manual_seed(0)
    up = torch.nn.ConvTranspose2d(6, 5, kernel_size=2, stride=2)
    x = torch.randn(3, 6, 4, 7)
    got = upsample_2x(up, x)
    torch.testing.assert_close(got, up(x), atol=1e-6, rtol=1e-6)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_up_with_shared_guidance_features_equals_concatenation() -> None:
    torch.manual_seed(0)
    up = Up(16, 8, 4)
    x, guidance = torch.randn(2 * 3, 16, 5, 5), torch.randn(2, 4, 10, 10)  # 2 images x 3 classes
    expected = up_copying(up, x, guidance)
    features = up.guidance_features(guidance)  # (2, 8, 10, 10)
    got = torch.cat([up(x[3 * b : 3 * b + 3], features[b : b + 1]) for b in range(2)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_padded_computation_restores_the_forwards_and_refuses_nesting() -> None:
    model = build_tiny()
    with padded_computation(model):
        assert "forward" in vars(model.sem_seg_head.predictor.transformer)
        with pytest.raises(RuntimeError, match="nested"), padded_computation(model):
            pass
    assert not any("forward" in vars(m) for m in model.modules())


# -- the tiny model, end to end ----------------------------------------------------------------------


def tiny_probabilities(mode: str, batch: int, classes: int, attention: str) -> tuple[list, list]:
    """Probabilities of a tiny CAT-Seg (non-zero learnt padding) and of its padded computation."""
    opts = ["MODEL.SEM_SEG_HEAD.ATTENTION_TYPE", attention]
    if mode == "sliding":  # SemLA's inference mode; the whole-image path keeps tiny.yaml's pooling [2, 2]
        opts += ["TEST.SLIDING_WINDOW", "True", "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]"]
    model = build_tiny(opts=tuple(opts)).eval()
    model.set_class_names(test=class_names(classes))
    nonzero_padding(model)
    inputs = random_inputs(batch)
    with torch.no_grad():
        text = model.text_features()
        got = [o["sem_seg"] for o in model(inputs, text_features=text)]
        with padded_computation(model):
            expected = [o["sem_seg"] for o in model(inputs, text_features=text)]
    return got, expected


def tiny_gradients(batch: int, classes: int, attention: str) -> None:
    """Training-mode gradients of a tiny CAT-Seg equal those of its padded computation."""
    model = build_tiny(opts=("MODEL.SEM_SEG_HEAD.ATTENTION_TYPE", attention)).train()
    model.set_class_names(train=class_names(classes))
    nonzero_padding(model)
    model.double()
    inputs = random_inputs(batch, sizes=((32, 32),), num_classes=min(classes, 19))
    with padded_computation(model):
        model(inputs)["loss_sem_seg"].backward()
    reference = trainable_grads(model)
    model.zero_grad()
    model(inputs)["loss_sem_seg"].backward()
    assert_gradients_close(model, reference)
    padding = "sem_seg_head.predictor.transformer.layers.0.attention.padding_tokens"
    if classes < model.sem_seg_head.predictor.transformer.pad_len:
        assert reference[padding].norm() > 0, "the padding token must receive a gradient"


@pytest.mark.parametrize("attention", ["linear", "full"])
@pytest.mark.parametrize("classes", CLASS_COUNTS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_tiny_probabilities_match_padded(mode: str, batch: int, classes: int, attention: str) -> None:
    got, expected = tiny_probabilities(mode, batch, classes, attention)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and a.shape[0] == classes
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["linear", "full"])
@pytest.mark.parametrize("classes", CLASS_COUNTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_gradients_match_padded(batch: int, classes: int, attention: str) -> None:
    tiny_gradients(batch, classes, attention)


@pytest.mark.parametrize("attention", ["linear", "full"])
@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_small_uneven_chunks_change_nothing(mode: str, attention: str, monkeypatch) -> None:  # noqa: ANN001
    """With a chunk size that splits every chunked stage unevenly, results are still the padded ones."""
    monkeypatch.setattr(agg, "CHUNK_ROWS", 37)
    got, expected = tiny_probabilities(mode, 3, 19, attention)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    tiny_gradients(3, 19, attention)


# -- CAT-Seg ViT-B/16 widths ---------------------------------------------------------------------------


def vitb_aggregator(attention: str, pooling: tuple[int, int], grid: int = 4) -> Aggregator:
    """The ``vitb_384`` aggregator (widths, heads, pad_len 256) on a small grid with shifted windows."""
    kwargs = model_kwargs_from_cfg(load_config(VITB_CONFIG))
    settings = dict(kwargs["aggregator"], attention_type=attention, pooling_size=pooling)
    settings.update(feature_resolution=(grid, grid), window=grid // 2)  # 4 windows, shift 1
    torch.manual_seed(0)
    model = Aggregator(prompt_channels=1, pad_len=kwargs["preset"].pad_len, **settings)
    nonzero_padding(model)
    assert model.pad_len == 256 and model.layers[0].swin_block.block_2.shift > 0
    return model


def vitb_inputs(views: int, classes: int, grid: int = 4, dtype: torch.dtype = torch.float32) -> tuple:
    """Image features, text features and guidance shaped like ``vitb_384``'s, on a ``grid`` token grid."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(views, 512, grid, grid, generator=g, dtype=dtype)
    text = F.normalize(torch.randn(classes, 1, 512, generator=g, dtype=dtype), dim=-1)
    guidance = [
        torch.randn(views, 512, grid, grid, generator=g, dtype=dtype),
        torch.randn(views, 256, 2 * grid, 2 * grid, generator=g, dtype=dtype),
        torch.randn(views, 128, 4 * grid, 4 * grid, generator=g, dtype=dtype),
    ]
    return image, text.expand(views, -1, -1, -1), guidance


@pytest.mark.parametrize("attention", ["linear", "full"])
@pytest.mark.parametrize("classes", CLASS_COUNTS)
@pytest.mark.parametrize("mode, batch", [("whole", 1), ("whole", 3), ("sliding", 1)])
def test_vitb_aggregator_probabilities_match_padded(
    mode: str, batch: int, classes: int, attention: str
) -> None:
    """Whole image: one view per image, pooling [2, 2] (vitb_384.yaml); sliding window: 4 crops and a global
    view per image, pooling [1, 1] (SemLA's setting). The aggregator sees views, not images: sliding-window
    batch 3 (15 views) runs the code of batch 1 (5 views) on more rows, and is covered end to end on tiny.
    """
    views, pooling = (batch, (2, 2)) if mode == "whole" else (5 * batch, (1, 1))
    model = vitb_aggregator(attention, pooling).eval()
    image, text, guidance = vitb_inputs(views, classes)
    with torch.no_grad():
        got = model(image, text, guidance).sigmoid()
        with padded_computation(model):
            expected = model(image, text, guidance).sigmoid()
    assert got.shape == (views, classes, 16, 16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["linear", "full"])
@pytest.mark.parametrize("classes", CLASS_COUNTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_vitb_aggregator_gradients_match_padded(batch: int, classes: int, attention: str) -> None:
    model = vitb_aggregator(attention, (2, 2)).train().double()
    image, text, guidance = vitb_inputs(batch, classes, dtype=torch.float64)
    targets = torch.rand(batch, classes, 16, 16, generator=torch.Generator().manual_seed(1)).round().double()

    def loss() -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(image, text, guidance), targets)

    with padded_computation(model):
        loss().backward()
    reference = trainable_grads(model)
    model.zero_grad()
    loss().backward()
    assert_gradients_close(model, reference)


@pytest.mark.slow
def test_vitb_384_model_probabilities_match_padded() -> None:
    """The whole randomly initialised ``vitb_384`` CAT-Seg at its real 24 x 24 grid (window 12, shift 6)."""
    opts = ["MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", "datasets/cs19.json"]
    torch.manual_seed(0)
    model = build_model(load_config(VITB_CONFIG, opts)).eval()
    nonzero_padding(model)
    inputs = random_inputs(1, sizes=((384, 384),))
    with torch.no_grad():
        text = model.text_features()
        got = model(inputs, text_features=text)[0]["sem_seg"]
        with padded_computation(model):
            expected = model(inputs, text_features=text)[0]["sem_seg"]
    assert got.shape == (19, 384, 384)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
