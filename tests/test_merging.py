"""Every ``add_weighted_adapter`` combination type, merged per image, against real PEFT.

For each type, a batch of two images with two different weight rows goes through
``fused_adapters(model, merged_library(...), eye(2))``; each image must give what PEFT gives for it
(``add_weighted_adapter`` of that image's adapters + ``set_adapter``), and every merged layer's delta
must equal PEFT's ``get_delta_weight`` of the merged adapter.

DARE: PEFT draws its masks from torch's global RNG in its own order, while ours come from generators
seeded per (seed, module, adapter, tensor) so that they do not depend on the batch. So PEFT's real merge
is run with ``torch.bernoulli`` replaced by a function returning *our* masks (``dare_mask``) in PEFT's
draw order (modules in ``named_modules`` order; per module the A's then the B's of the adapters, or
their deltas for the SVD types); everything else (rescaling, sign election, disjoint mean, SVD) is
PEFT's own code.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from helpers import build_tiny, random_inputs
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from cat_seg.lora import semla_target_modules
from domain_orchestrator.fusion import fused_adapters, fused_text_features
from domain_orchestrator.library import AdapterLibrary
from domain_orchestrator.merging import (
    CombinationSpec,
    check_combination,
    dare_mask,
    merge_adapters,
    merged_library,
)
from domain_orchestrator.synthetic import linear_shapes, write_random_adapter

# a: r4; b: r4 rsLoRA; c: r4 on a subset of the layers; d: r2; e: r6 rsLoRA
NAMES = ["a", "b", "c", "d", "e"]
RANKS = [4, 4, 4, 2, 6]
ALPHAS = [8.0, 6.0, 16.0, 4.0, 3.0]
RSLORA = [False, True, False, False, True]

# Equal ranks (factor types): image 0 merges a, b (rsLoRA, not first), c (negative weight); image 1 a, c.
EQUAL_RANKS = [[0.7, 0.5, -0.4, 0.0, 0.0], [0.3, 0.0, 0.9, 0.0, 0.0]]
# Mixed ranks (cat, SVD types): image 0 merges a, d, e (r 4, 2, 6); image 1 b, c, d: its first adapter is
# rsLoRA, so PEFT's merged adapter has scaling sqrt(r) (reproduced by default).
MIXED_RANKS = [[0.6, 0.0, 0.0, 0.5, -0.3], [0.0, 0.8, 0.4, 0.7, 0.0]]

CASES = {
    "cat": ("cat", {}, MIXED_RANKS),
    "linear": ("linear", {}, EQUAL_RANKS),
    "svd": ("svd", {"svd_rank": 3}, MIXED_RANKS),
    "svd-clamp": ("svd", {"svd_clamp": 0.9}, MIXED_RANKS),
    "ties": ("ties", {"density": 0.5}, EQUAL_RANKS),
    "ties_svd": (
        "ties_svd",
        {"density": 0.6, "majority_sign_method": "frequency", "svd_rank": 3},
        MIXED_RANKS,
    ),
    "dare_linear": ("dare_linear", {"density": 0.7}, EQUAL_RANKS),
    "dare_ties": ("dare_ties", {"density": 0.5, "majority_sign_method": "frequency"}, EQUAL_RANKS),
    "dare_linear_svd": ("dare_linear_svd", {"density": 0.5, "svd_full_matrices": False}, MIXED_RANKS),
    "dare_ties_svd": ("dare_ties_svd", {"density": 0.5, "svd_rank": 5}, MIXED_RANKS),
    "magnitude_prune": ("magnitude_prune", {"density": 0.4}, EQUAL_RANKS),
    "magnitude_prune_svd": (
        "magnitude_prune_svd",
        {"density": 0.5, "svd_rank": 2, "svd_clamp": 0.95},
        MIXED_RANKS,
    ),
}


def _write_library(root, model) -> None:  # noqa: ANN001
    shapes = linear_shapes(model, semla_target_modules(model))
    subset = {k: v for i, (k, v) in enumerate(shapes.items()) if i % 3 != 1}  # "c" skips a third
    rng = np.random.default_rng(0)
    for i, name in enumerate(NAMES):
        write_random_adapter(
            root / name,
            subset if name == "c" else shapes,
            rank=RANKS[i],
            alpha=ALPHAS[i],
            seed=10 + i,
            std=0.15,
            embedding=rng.normal(size=16),
            use_rslora=RSLORA[i],
        )


def _peft(model, root):  # noqa: ANN001, ANN202
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), root / NAMES[0], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        peft_model.load_adapter(root / name, adapter_name=name)
    return peft_model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # noqa: ANN202
    """One intra-op thread: the matrices are tiny, and LAPACK's threads stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):  # noqa: ANN201, ANN001
    root = tmp_path_factory.mktemp("loradb")
    model = build_tiny(seed=0).eval()
    _write_library(root, model)
    library = AdapterLibrary.open(root, NAMES, model=model)
    return model, library, _peft(model, root), root


def _lora_layers(peft_model):  # noqa: ANN001, ANN202
    """PEFT's LoRA layers in the order ``add_weighted_adapter`` visits them."""
    lora = peft_model.base_model
    return [
        (k, m) for k, m in lora.model.named_modules() if lora.prefix not in k and isinstance(m, LoraLayer)
    ]


@contextlib.contextmanager
def _our_dare_masks(peft_model, names: list[str], spec: CombinationSpec):  # noqa: ANN001, ANN202
    """Make PEFT's ``torch.bernoulli`` return our DARE masks, in PEFT's draw order."""
    parts = ["delta"] if spec.combination_type.endswith("_svd") else ["A", "B"]
    order = []
    for key, layer in _lora_layers(peft_model):
        valid = [n for n in names if n in layer.lora_A]
        order += [(key, n, part) for part in parts for n in valid]
    calls = iter(order)

    def bernoulli(input, *args, **kwargs):  # noqa: A002, ANN001, ANN002, ANN003, ANN202
        module, name, part = next(calls)
        return dare_mask(spec.seed, module, name, part, input.shape, spec.density).to(input.dtype)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "bernoulli", bernoulli)
        yield
    assert next(calls, None) is None, "PEFT drew fewer masks than expected"


@contextlib.contextmanager
def _peft_merged(peft_model, weights: list[float], spec: CombinationSpec):  # noqa: ANN001, ANN202
    """PEFT's merge of the adapters with non-zero weight, active inside the block."""
    names = [n for n, w in zip(NAMES, weights) if w != 0]
    kwargs = {
        "svd_rank": spec.svd_rank,
        "svd_clamp": spec.svd_clamp,
        "svd_full_matrices": spec.svd_full_matrices,
        "svd_driver": spec.svd_driver,
        "density": spec.density,
        "majority_sign_method": spec.majority_sign_method,
    }
    dare = spec.combination_type.startswith("dare") and len(names) > 1
    with _our_dare_masks(peft_model, names, spec) if dare else contextlib.nullcontext():
        peft_model.add_weighted_adapter(
            names, [w for w in weights if w != 0], "merged", combination_type=spec.combination_type, **kwargs
        )
    peft_model.set_adapter("merged")
    try:
        yield
    finally:
        peft_model.set_adapter(NAMES[0])
        peft_model.delete_adapter("merged")


def _assert_deltas_equal_peft(peft_model, merged, image: int) -> None:  # noqa: ANN001
    """Every layer's merged delta (ours, scaling 1) against PEFT's merged adapter's delta."""
    checked = 0
    for key, layer in _lora_layers(peft_model):
        ours = merged.layers[key].B[image].double() @ merged.layers[key].A[image].double()
        if "merged" not in layer.lora_A:
            assert not ours.any(), f"{key}: PEFT merged nothing there"
            continue
        with torch.no_grad():
            expected = layer.get_delta_weight("merged").double()
        scale = float(expected.abs().max())
        assert scale > 0
        torch.testing.assert_close(ours, expected, atol=1e-4 * scale, rtol=0, msg=f"{key}")
        checked += 1
    assert checked > 0


def _outputs(model, inputs, merged=None):  # noqa: ANN001, ANN202
    with torch.no_grad():
        if merged is None:
            return [o["sem_seg"] for o in model(inputs)]
        eye = torch.eye(len(merged), dtype=torch.float64)
        text = fused_text_features(model, merged, eye)
        with fused_adapters(model, merged, eye):
            return [o["sem_seg"] for o in model(inputs, text_features=text)]


@pytest.mark.parametrize("case", list(CASES))
def test_every_combination_type_equals_peft_per_image(setup, case: str) -> None:  # noqa: ANN001
    model, library, peft_model, _ = setup
    kind, options, weights = CASES[case]
    spec = CombinationSpec(kind, seed=7, **options)
    inputs = random_inputs(2, sizes=((32, 32),))
    merged = merged_library(library, torch.tensor(weights, dtype=torch.float64), spec)
    assert merged.names == ["image0", "image1"] and merged.scalings.tolist() == [1.0, 1.0]
    got = _outputs(model, inputs, merged)
    base = _outputs(model, inputs)
    for b in range(2):
        with _peft_merged(peft_model, weights[b], spec):
            _assert_deltas_equal_peft(peft_model, merged, b)
            with torch.no_grad():
                expected = [o["sem_seg"] for o in peft_model.get_base_model()([inputs[b]])][0]
        assert (expected - base[b]).abs().max() > 1e-3, "the merged adapter must change the output"
        torch.testing.assert_close(got[b], expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["ties_svd", "dare_ties", "svd"])
def test_one_adapter_is_merged_with_linear_whatever_the_type(setup, kind: str) -> None:  # noqa: ANN001
    _, library, peft_model, _ = setup
    weights = [0.0, 0.0, 0.0, 0.0, 0.6]  # "e": rank 6, rsLoRA (PEFT's merged scaling sqrt(6))
    spec = CombinationSpec(kind, svd_rank=3, density=0.3)  # ignored by PEFT for one adapter
    merged = merged_library(library, torch.tensor([weights]), spec)
    assert merged.infos[0].rank == 6
    with _peft_merged(peft_model, weights, spec):
        _assert_deltas_equal_peft(peft_model, merged, 0)


def test_layers_that_no_image_merges_stay_usable_by_fusion(setup) -> None:  # noqa: ANN001
    model, library, peft_model, _ = setup
    merged = merged_library(library, torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]), CombinationSpec("ties"))
    skipped = [name for name in library.layers if name not in library.infos[2].target_modules]
    assert skipped and all(not merged.layers[n].A.any() and merged.layers[n].A.shape[1] >= 1 for n in skipped)
    inputs = random_inputs(1, sizes=((32, 32),))
    peft_model.set_adapter("c")
    try:
        with torch.no_grad():
            expected = peft_model.get_base_model()(inputs)[0]["sem_seg"]
    finally:
        peft_model.set_adapter(NAMES[0])
    torch.testing.assert_close(_outputs(model, inputs, merged)[0], expected, atol=2e-5, rtol=0)


def test_rslora_scaling_quirk_can_be_turned_off(setup) -> None:  # noqa: ANN001
    _, library, _, _ = setup
    weights = torch.tensor([MIXED_RANKS[1]])  # first adapter "b" is rsLoRA
    peft_like = merged_library(library, weights, CombinationSpec("svd", svd_rank=3))
    plain = merged_library(library, weights, CombinationSpec("svd", svd_rank=3, peft_rslora_scaling=False))
    for name in library.layers:
        torch.testing.assert_close(peft_like.layers[name].B, plain.layers[name].B * 3**0.5)
        torch.testing.assert_close(peft_like.layers[name].A, plain.layers[name].A)


REFUSED = [
    ("linear", {}, ["a", "d"]),
    ("dare_ties", {"density": 0.5}, ["a", "e"]),
    ("bogus", {}, ["a", "b"]),
    ("ties", {"density": -0.1}, ["a", "b"]),
    ("ties", {"density": None}, ["a", "b"]),
    ("dare_ties", {"density": 0.5, "majority_sign_method": "median"}, ["a", "b"]),
    ("svd", {"svd_clamp": 1.5}, ["a", "d"]),
]


@pytest.fixture
def fresh_peft(setup):  # noqa: ANN001, ANN201
    """A PEFT model of its own (a failed merge may leave it half-made)."""
    model, _, _, root = setup
    return _peft(model, root)


def test_refusals_give_peft_reason(setup, fresh_peft) -> None:  # noqa: ANN001
    _, library, _, _ = setup
    for kind, options, names in REFUSED:
        spec = CombinationSpec(kind, **options)
        reason = check_combination(spec, [RANKS[NAMES.index(n)] for n in names])
        assert reason is not None and "\n" not in reason, (kind, options)
        with pytest.raises((ValueError, RuntimeError, TypeError)) as peft_error:
            fresh_peft.add_weighted_adapter(
                names, [0.5] * len(names), f"m{len(REFUSED)}", combination_type=kind, **options
            )
        fresh_peft.peft_config.pop(f"m{len(REFUSED)}", None)
        assert str(peft_error.value) in reason, (str(peft_error.value), reason)
        weights = torch.tensor([[0.0] * len(NAMES), [0.5 if n in names else 0.0 for n in NAMES]])
        with pytest.raises(ValueError, match="image 1") as ours:
            merged_library(library, weights, spec)
        assert reason in str(ours.value)
    # what PEFT accepts
    assert check_combination(CombinationSpec("ties"), [4]) is None  # one adapter: linear, no density needed
    assert check_combination(CombinationSpec("ties_svd", density=0.5), [4, 2, 6]) is None
    assert check_combination(CombinationSpec("linear"), []) is not None


def test_svd_rank_above_the_layer_size_is_refused_with_full_matrices(setup, fresh_peft) -> None:  # noqa: ANN001
    _, library, _, _ = setup
    weights = torch.tensor([MIXED_RANKS[0]])
    with pytest.raises(RuntimeError):  # PEFT: the 48 x 32 layers cannot take rank 40
        fresh_peft.add_weighted_adapter(["a", "d", "e"], [0.6, 0.5, -0.3], "big", svd_rank=40)
    with pytest.raises(ValueError, match="svd_rank 40 exceeds min"):
        merged_library(library, weights, CombinationSpec("svd", svd_rank=40))
    # without full matrices PEFT keeps min(out, in) components: the whole delta
    merged = merged_library(library, weights, CombinationSpec("svd", svd_rank=40, svd_full_matrices=False))
    cat = merged_library(library, weights, CombinationSpec("cat"))
    for name in library.layers:
        torch.testing.assert_close(
            merged.layers[name].B[0] @ merged.layers[name].A[0], cat.layers[name].B[0] @ cat.layers[name].A[0]
        )


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties_svd"])
def test_dare_is_deterministic_and_independent_of_the_batch(setup, kind: str) -> None:  # noqa: ANN001
    _, library, _, _ = setup
    rows = EQUAL_RANKS if kind == "dare_linear" else MIXED_RANKS
    weights = torch.tensor([rows[0], rows[1], [0.5, 0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    spec = CombinationSpec(kind, density=0.5, seed=3)
    first = merged_library(library, weights, spec)
    again = merged_library(library, weights, spec)
    alone = merged_library(library, weights[1:2], spec)
    other_seed = merged_library(library, weights, CombinationSpec(kind, density=0.5, seed=4))
    differs = False
    for name, stack in first.layers.items():
        assert torch.equal(stack.A, again.layers[name].A) and torch.equal(stack.B, again.layers[name].B)
        delta = stack.B[1] @ stack.A[1]
        torch.testing.assert_close(
            alone.layers[name].B[0] @ alone.layers[name].A[0], delta, atol=1e-6 * delta.abs().max(), rtol=0
        )
        differs |= not torch.allclose(other_seed.layers[name].B[1] @ other_seed.layers[name].A[1], delta)
    assert differs


def test_merge_adapters_on_one_layer() -> None:
    """The public per-layer entry: one weight row, zero-padded ranks, a layer an adapter skips."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 5, 20, generator=g, dtype=torch.float64)
    B = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)  # out 6 < K = 15
    ranks = [5, 3, 4]
    for i, r in enumerate(ranks):
        A[i, r:] = 0
        B[i, :, r:] = 0
    from domain_orchestrator.library import LayerStack

    stack = LayerStack(A, B)
    scal = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    w = torch.tensor([0.4, -0.7, 0.2], dtype=torch.float64)
    full = sum(w[i] * scal[i] * B[i] @ A[i] for i in range(3))
    u, s, vh = torch.linalg.svd(full)
    a, b = merge_adapters(stack, scal, ranks, w, CombinationSpec("svd", svd_rank=4))
    assert a.shape == (4, 20) and b.shape == (6, 4)
    torch.testing.assert_close(b @ a, (u[:, :4] * s[:4]) @ vh[:4])
    # adapter 1 does not target this layer: it takes no part
    a, b = merge_adapters(stack, scal, ranks, w, CombinationSpec("cat"), present=[True, False, True])
    torch.testing.assert_close(b @ a, full - w[1] * scal[1] * B[1] @ A[1])
    # a batch: a zero row gives the zero adapter
    a, b = merge_adapters(
        stack, scal, ranks, torch.stack([w, torch.zeros(3, dtype=torch.float64)]), CombinationSpec("svd")
    )
    assert a.shape[0] == 2 and not a[1].any() and not b[1].any()


@pytest.mark.parametrize("shape", [(300, 120), (90, 256), (2, 160, 100)])
def test_truncated_svd_equals_the_full_svd(shape: tuple[int, ...]) -> None:
    """The eigh + Rayleigh-Ritz route (used above 2 x (rank + 8) columns) against ``torch.linalg.svd``:
    same singular values, same rank-r reconstruction; low-rank input gives itself back."""
    from domain_orchestrator.merging import truncated_svd

    g = torch.Generator().manual_seed(1)
    # a decaying spectrum, then a float32 matrix with a dense (pruning-like) tail
    matrix = torch.randn(*shape, generator=g, dtype=torch.float64)
    matrix = matrix * (torch.rand(*shape, generator=g, dtype=torch.float64) < 0.5)
    matrix = matrix + 3 * torch.randn(*shape[:-1], 6, generator=g, dtype=torch.float64) @ torch.randn(
        *shape[:-2], 6, shape[-1], generator=g, dtype=torch.float64
    )
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        x = matrix.to(dtype)
        u, s, vh = truncated_svd(x, 5)
        assert (
            u.shape == (*shape[:-1], 5)
            and s.shape == (*shape[:-2], 5)
            and vh.shape == (*shape[:-2], 5, shape[-1])
        )
        fu, fs, fvh = torch.linalg.svd(matrix, full_matrices=False)
        expected = (fu[..., :5] * fs[..., None, :5]) @ fvh[..., :5, :]
        torch.testing.assert_close(s.double(), fs[..., :5], atol=tol * float(fs.max()), rtol=0)
        got = (u * s[..., None, :]).double() @ vh.double()
        torch.testing.assert_close(got, expected, atol=tol * float(expected.abs().max()), rtol=0)
    low = matrix[..., :3] @ matrix.transpose(-2, -1)[..., :3, :]  # rank 3, asked for 5
    u, s, vh = truncated_svd(low, 5)
    torch.testing.assert_close((u * s[..., None, :]) @ vh, low)


@pytest.mark.parametrize("case", ["random", "ties", "edges"])
def test_kth_smallest_equals_kthvalue(case: str) -> None:
    from domain_orchestrator.merging import _kth_smallest, _top_magnitudes

    g = torch.Generator().manual_seed(2)
    values = torch.randn(400_000, generator=g).abs()
    if case == "ties":
        values = (values * 4).round()  # a handful of distinct values, every one tied many times
    ks = [1, 2, 400_000, 399_999] if case == "edges" else [100_000, 200_000, 200_001, 390_000]
    for k in ks:
        assert torch.equal(_kth_smallest(values, k), values.kthvalue(k).values), k
    matrix = values.reshape(400, 1000)
    for k in (1, 123_457, 399_999):  # magnitude pruning keeps exactly k, the largest, as topk does
        keep = _top_magnitudes(matrix, k)
        assert int(keep.sum()) == k
        assert float(matrix[keep].min()) >= float(matrix[~keep].max())
