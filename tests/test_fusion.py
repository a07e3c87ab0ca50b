"""Fused multi-adapter LoRA forward against real PEFT (add_weighted_adapter "cat" + set_adapter)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import build_tiny, random_inputs
from peft import PeftModel

from cat_seg.lora import semla_target_modules
from domain_orchestrator.fusion import fused_adapters, fused_text_features
from domain_orchestrator.library import AdapterLibrary
from domain_orchestrator.retrieval import semla_weights
from domain_orchestrator.synthetic import linear_shapes, write_random_adapter

NAMES = ["acdc-fog", "bdd", "mv", "nyu"]
RANKS = [2, 4, 8, 3]
ALPHAS = [4.0, 8.0, 16.0, 1.5]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):  # noqa: ANN201, ANN001
    root = tmp_path_factory.mktemp("loradb")
    model = build_tiny(seed=0).eval()
    shapes = linear_shapes(model, semla_target_modules(model))
    rng = np.random.default_rng(0)
    for i, name in enumerate(NAMES):
        write_random_adapter(
            root / name,
            shapes,
            rank=RANKS[i],
            alpha=ALPHAS[i],
            seed=i,
            std=0.1,
            embedding=rng.normal(size=16),
        )
    library = AdapterLibrary.open(root, NAMES, model=model)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), root / NAMES[0], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        peft_model.load_adapter(root / name, adapter_name=name)
    peft_model.eval()
    return model, library, peft_model, root


def _peft_fused(peft_model, weights: list[float], inputs, text_inside: bool = True):  # noqa: ANN001, ANN202
    """The reference path: merge the weighted adapters with PEFT, activate, forward, delete."""
    active = [(n, w) for n, w in zip(NAMES, weights) if w != 0]
    peft_model.add_weighted_adapter(
        [n for n, _ in active], [w for _, w in active], "fused", combination_type="cat"
    )
    peft_model.set_adapter("fused")
    try:
        with torch.no_grad():
            return [o["sem_seg"] for o in peft_model.get_base_model()(inputs)]
    finally:
        peft_model.set_adapter(NAMES[0])
        peft_model.delete_adapter("fused")


def _fused(model, library, weights, inputs, mode="auto"):  # noqa: ANN001, ANN202
    weights = torch.tensor(weights, dtype=torch.float64)
    with torch.no_grad():
        text = fused_text_features(model, library, weights, mode=mode)  # (B, T, P, C)
        with fused_adapters(model, library, weights, mode=mode):
            return [o["sem_seg"] for o in model(inputs, text_features=text)]


def _base(model, inputs):  # noqa: ANN001, ANN202
    with torch.no_grad():
        return [o["sem_seg"] for o in model(inputs)]


@pytest.mark.parametrize("top_k", [1, 3, 4])
@pytest.mark.parametrize("mode", ["auto", "merged", "unmerged"])
def test_fused_forward_equals_peft_cat(setup, top_k: int, mode: str) -> None:  # noqa: ANN001
    model, library, peft_model, _ = setup
    inputs = random_inputs(1)
    scores = torch.tensor([[0.3, 0.9, 0.5, 0.7]], dtype=torch.float64)
    weights = semla_weights(scores, top_k=top_k, temperature=0.5)[0].tolist()
    assert sum(w > 0 for w in weights) == top_k
    expected = _peft_fused(peft_model, weights, inputs)
    got = _fused(model, library, [weights], inputs, mode)
    base = _base(model, inputs)
    assert (expected[0] - base[0]).abs().max() > 1e-3, "the adapters must change the output"
    torch.testing.assert_close(got[0], expected[0], atol=2e-5, rtol=0)


def test_per_image_weights_in_one_batch_equal_peft_run_per_image(setup) -> None:  # noqa: ANN001
    model, library, peft_model, _ = setup
    model.sliding_window = peft_model.get_base_model().sliding_window = True
    try:
        inputs = random_inputs(3, sizes=((50, 70), (41, 33), (64, 64)))
        weights = torch.tensor(
            [[0.0, 0.7, 0.0, 0.3], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64
        )
        with torch.no_grad():
            text = fused_text_features(model, library, weights)  # (3, T, P, C): each image's own text
            with fused_adapters(model, library, weights):
                got = [o["sem_seg"] for o in model(inputs, text_features=text)]
        for i in range(3):
            expected = _peft_fused(peft_model, weights[i].tolist(), [inputs[i]])
            torch.testing.assert_close(got[i], expected[0], atol=2e-5, rtol=0)
    finally:
        model.sliding_window = peft_model.get_base_model().sliding_window = False


def test_one_adapter_with_weight_one_equals_that_adapter_in_peft(setup) -> None:  # noqa: ANN001
    model, library, peft_model, _ = setup
    inputs = random_inputs(1)
    peft_model.set_adapter("mv")
    with torch.no_grad():
        expected = [o["sem_seg"] for o in peft_model.get_base_model()(inputs)]
    peft_model.set_adapter(NAMES[0])
    # Batch of one: the class-text features may also be computed inside the block, by the model.
    with torch.no_grad(), fused_adapters(model, library, torch.tensor([0.0, 0.0, 1.0, 0.0])):
        got = [o["sem_seg"] for o in model(inputs)]
    torch.testing.assert_close(got[0], expected[0], atol=2e-5, rtol=0)


def test_zero_weights_equal_the_base_model_exactly(setup) -> None:  # noqa: ANN001
    model, library, _, _ = setup
    inputs = random_inputs(2)
    for a, b in zip(_fused(model, library, [[0.0] * 4, [0.0] * 4], inputs), _base(model, inputs)):
        assert torch.equal(a, b)


def test_model_is_bit_identical_after_the_block_even_when_the_forward_raises(setup) -> None:  # noqa: ANN001
    model, library, _, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linear_forward = torch.nn.Linear.forward
    _fused(model, library, [[0.1, 0.2, 0.3, 0.4]], random_inputs(1))
    with pytest.raises(RuntimeError, match="cannot be split over 2 images"):
        with torch.no_grad(), fused_adapters(model, library, torch.full((2, 4), 0.25)):
            model(random_inputs(3))  # 3 images with 2 weight vectors
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    modules = dict(model.named_modules())
    assert all("forward" not in modules[name].__dict__ for name in library.layers), "no override left behind"
    assert torch.nn.Linear.forward is linear_forward
    assert not any(isinstance(m, PeftModel) or "lora" in n for n, m in model.named_modules())


def test_merged_and_unmerged_agree_for_a_batch(setup) -> None:  # noqa: ANN001
    model, library, _, _ = setup
    inputs = random_inputs(2, sizes=((40, 40),))
    weights = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.1, 0.2, 0.7]]
    a = _fused(model, library, weights, inputs, "merged")
    b = _fused(model, library, weights, inputs, "unmerged")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=0)


def test_bad_weights_and_nesting_are_refused(setup) -> None:  # noqa: ANN001
    model, library, _, _ = setup
    with pytest.raises(ValueError, match=r"weights must be \(B, 4\)"):
        with fused_adapters(model, library, torch.ones(3)):
            pass
    with pytest.raises(ValueError, match="NaN"):
        with fused_adapters(model, library, torch.tensor([float("nan"), 0, 0, 0])):
            pass
    with pytest.raises(RuntimeError, match="nesting"):
        with (
            fused_adapters(model, library, torch.ones(4) / 4),
            fused_adapters(model, library, torch.ones(4) / 4),
        ):
            pass
