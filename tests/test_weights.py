"""Scores and fusion weights, with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from domain_orchestrator.retrieval import scores, semla_weights, topk_indices, uniform_weights


def test_inverse_euclidean_scores_by_hand() -> None:
    x = torch.tensor([[0.0, 0.0]])
    protos = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])
    # distances 5, 1, 2 -> scores 0.2, 1, 0.5
    torch.testing.assert_close(scores(x, protos), torch.tensor([[0.2, 1.0, 0.5]], dtype=torch.float64))


def test_cosine_scores_higher_is_closer() -> None:
    x = torch.tensor([1.0, 0.0])
    protos = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [1.0, 1.0]])
    expected = torch.tensor([[1.0, 0.0, -1.0, 1 / math.sqrt(2)]], dtype=torch.float64)
    torch.testing.assert_close(scores(x, protos, "cosine"), expected)
    assert topk_indices(scores(x, protos, "cosine"), 1).item() == 0  # the most similar, not the farthest


def test_semla_weights_by_hand() -> None:
    s = torch.tensor([[0.2, 1.0, 0.5, 0.4]], dtype=torch.float64)
    w = semla_weights(s, top_k=2, temperature=0.5)
    # top-2 = scores 1.0 (index 1) and 0.5 (index 2): softmax([2, 1]) = [e^2, e^1] / (e^2 + e^1)
    e2, e1 = math.exp(2.0), math.exp(1.0)
    torch.testing.assert_close(
        w, torch.tensor([[0.0, e2 / (e2 + e1), e1 / (e2 + e1), 0.0]], dtype=torch.float64)
    )


def test_reference_formula_for_the_euclidean_default() -> None:
    """SemLA: s_i = 1/||x - p_i||, sort descending, keep top-k, exp(s/T) / sum exp(s/T)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=768)
    protos = rng.normal(size=(20, 768)) + 0.05 * x
    t, k = 0.05, 5
    sims = [1.0 / np.sqrt(((x - p) ** 2).sum()) for p in protos]
    order = sorted(range(20), key=lambda i: sims[i], reverse=True)[:k]
    exp = [math.exp(sims[i] / t) for i in order]
    expected = np.zeros(20)
    for i, e in zip(order, exp):
        expected[i] = e / sum(exp)
    got = semla_weights(scores(torch.from_numpy(x)[None], torch.from_numpy(protos)), top_k=k, temperature=t)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-12, atol=1e-15)


def test_weight_invariants() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(16, 12, generator=g, dtype=torch.float64)
    for k in (1, 3, 12):
        w = semla_weights(s, top_k=k, temperature=0.1)
        torch.testing.assert_close(w.sum(dim=1), torch.ones(16, dtype=torch.float64))
        assert ((w > 0).sum(dim=1) == k).all()
        for row_w, row_s in zip(w, s):
            chosen = row_w > 0
            assert row_s[chosen].min() >= row_s[~chosen].max() if (~chosen).any() else True
            order_s = torch.argsort(row_s[chosen], descending=True)
            order_w = torch.argsort(row_w[chosen], descending=True)
            assert torch.equal(order_s, order_w), "weights follow the scores"
    one_hot = semla_weights(s, top_k=1, temperature=1.0)
    assert torch.equal(one_hot.argmax(dim=1), s.argmax(dim=1)) and (one_hot.max(dim=1).values == 1).all()


def test_ties_keep_library_order_and_exclusion() -> None:
    s = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9]], dtype=torch.float64)
    assert topk_indices(s, 2).tolist() == [[1, 2]]
    assert topk_indices(s, 2, exclude=[1]).tolist() == [[2, 4]]
    mask = torch.tensor([[False, True, True, False, False]])
    w = semla_weights(s, top_k=3, temperature=1.0, exclude=mask)
    assert w[0, 1] == 0 and w[0, 2] == 0 and (w[0, [0, 3, 4]] > 0).all()
    assert topk_indices(s, 10, exclude=[0]).shape == (1, 4), "fewer candidates than k keeps them all"


def test_uniform_weights_with_leave_one_out() -> None:
    w = uniform_weights(5, batch=2, exclude=[3])
    assert torch.equal(w, torch.tensor([[0.25, 0.25, 0.25, 0.0, 0.25]] * 2, dtype=torch.float64))
    torch.testing.assert_close(uniform_weights(4), torch.full((1, 4), 0.25, dtype=torch.float64))


def test_invalid_arguments() -> None:
    s = torch.rand(1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        semla_weights(s, top_k=2, temperature=0.0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        semla_weights(s, top_k=0, temperature=1.0)
    with pytest.raises(ValueError, match="every adapter is excluded"):
        semla_weights(s, top_k=1, temperature=1.0, exclude=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="dimension"):
        scores(torch.rand(1, 3), torch.rand(4, 5))
    with pytest.raises(ValueError, match="unknown measure"):
        scores(torch.rand(1, 3), torch.rand(4, 3), "manhattan")


def test_topk_matches_a_full_stable_sort_with_many_ties() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randint(0, 4, (32, 40), generator=g).double()  # lots of ties
    exclude = torch.rand(32, 40, generator=g) < 0.2
    for k in (1, 3, 7):
        got = topk_indices(s, k, exclude=exclude)
        ranked = torch.where(exclude, torch.full_like(s, -math.inf), s)
        expected = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(got, expected)


def test_cached_prototype_norms_give_the_same_scores() -> None:
    g = torch.Generator().manual_seed(0)
    x, p = torch.randn(3, 768, generator=g), torch.randn(50, 768, generator=g)
    direct = 1.0 / torch.linalg.vector_norm(x.double()[:, None] - p.double()[None], dim=-1)
    torch.testing.assert_close(scores(x, p), direct, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        scores(x, p, prototype_sq_norms=(p.double() ** 2).sum(1)), direct, rtol=1e-12, atol=0
    )
