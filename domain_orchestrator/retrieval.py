"""SemLA's domain retrieval: score images against domain prototypes, keep the top-k, weight them.

Pure functions of tensors (no I/O, no state). Higher score = closer domain. The paper's default score
is 1 / ||x - p||_2 between an image's CLIP embedding and a domain's mean embedding; the weights are a
temperature softmax over each image's top-k scores (zero for the other adapters)::

    w_i = exp(s_i / T) / sum_{j in topk} exp(s_j / T)   for i in topk,   0 otherwise

:func:`uniform_weights` gives the ``uniform`` baseline (1/N over the adapters not excluded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Measure",
    "cosine_scores",
    "inverse_euclidean_scores",
    "scores",
    "semla_weights",
    "topk_indices",
    "uniform_weights",
]

Measure = Literal["euclidean", "cosine"]


def inverse_euclidean_scores(
    embedding: Tensor, prototypes: Tensor, prototype_sq_norms: Tensor | None = None
) -> Tensor:
    """SemLA's default score: 1 / ||x - p||_2 (higher = closer).

    Computed in float64 as sqrt(|x|^2 - 2 x.p + |p|^2), one matrix product (the cancellation error is
    ~1e-16 relative here, far below float32 resolution).

    Args:
        embedding: (B, D) image embeddings (unnormalised CLIP features).
        prototypes: (N, D) domain prototypes.
        prototype_sq_norms: (N,) cached |p|^2 in float64 (optional, saves a pass over the prototypes).
    Returns:
        (B, N) scores, in float64 (an exact zero distance gives +inf).
    """
    x = embedding.double()
    p = prototypes.double()
    p_sq = (p * p).sum(dim=1) if prototype_sq_norms is None else prototype_sq_norms.double()
    sq = (x * x).sum(dim=1, keepdim=True) - 2.0 * (x @ p.T) + p_sq  # (B, N)
    return 1.0 / sq.clamp_min(0.0).sqrt()


def cosine_scores(embedding: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarity (higher = closer): (B, D) x (N, D) -> (B, N) float64.

    The original code's ``cosine`` option used the cosine *distance* with a descending sort, which
    selects the least similar domains; this is the similarity.
    """
    return F.normalize(embedding.double(), dim=-1) @ F.normalize(prototypes.double(), dim=-1).T


def scores(
    embedding: Tensor,
    prototypes: Tensor,
    measure: Measure = "euclidean",
    prototype_sq_norms: Tensor | None = None,
) -> Tensor:
    """Score images against library prototypes; higher = closer.

    Args:
        embedding: (B, D) or (D,) image embeddings.
        prototypes: (N, D).
        measure: ``euclidean`` (1 / distance, the original's effective default) or ``cosine``.
        prototype_sq_norms: optional cached (N,) |p|^2 for ``euclidean``.
    Returns:
        (B, N) float64.
    """
    embedding = embedding.reshape(1, -1) if embedding.dim() == 1 else embedding
    if embedding.shape[-1] != prototypes.shape[-1]:
        raise ValueError(
            f"embedding dimension {embedding.shape[-1]} != prototype dimension {prototypes.shape[-1]}"
        )
    if measure == "euclidean":
        return inverse_euclidean_scores(embedding, prototypes, prototype_sq_norms)
    if measure == "cosine":
        return cosine_scores(embedding, prototypes)
    raise ValueError(f"unknown measure {measure!r}; use 'euclidean' or 'cosine'")


def _exclusion_mask(
    exclude: Tensor | Sequence[int] | None, shape: tuple[int, int], device: torch.device
) -> Tensor:
    """(B, N) bool mask of excluded adapters from indices (N-wide), a (N,) or a (B, N) bool mask."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if exclude is None:
        return mask
    ex = torch.as_tensor(exclude, device=device)
    if ex.dtype == torch.bool:
        return mask | ex.expand(shape)
    mask[:, ex.long()] = True
    return mask


def topk_indices(scores: Tensor, top_k: int, exclude: Tensor | Sequence[int] | None = None) -> Tensor:
    """Indices of each row's ``top_k`` highest scores, best first.

    Ties keep library order (as the original's stable ``sorted(..., reverse=True)``): among equal
    scores at the cut, the adapters listed first are kept, and equal scores are listed in library order.
    Excluded adapters are never chosen; fewer than ``top_k`` candidates keeps all of them.
    Linear in the library size (one ``topk`` and a few element-wise passes; no full sort).

    Args:
        scores: (B, N).
        top_k: >= 1.
        exclude: adapter indices, or a (N,) / (B, N) bool mask, to leave out (leave-one-out).
    Returns:
        (B, k) int64 with k = min(top_k, number of candidates per row).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    mask = _exclusion_mask(exclude, tuple(scores.shape), scores.device)
    candidates = int((~mask).sum(dim=1).min())
    if candidates == 0:
        raise ValueError("every adapter is excluded")
    k = min(top_k, candidates)
    ranked = torch.where(mask, torch.full_like(scores, -math.inf), scores)
    kth = torch.topk(ranked, k, dim=1).values[:, -1:]  # (B, 1) the k-th best score
    above = ranked > kth
    tie = (ranked == kth) & ~mask
    need = k - above.sum(dim=1, keepdim=True)
    take = above | (tie & (tie.cumsum(dim=1) <= need))  # exactly k per row, earliest ties first
    idx = take.nonzero()[:, 1].reshape(scores.shape[0], k)  # ascending library order per row
    order = torch.sort(torch.gather(ranked, 1, idx), dim=1, descending=True, stable=True).indices
    return torch.gather(idx, 1, order)


def semla_weights(
    scores: Tensor, top_k: int, temperature: float, exclude: Tensor | Sequence[int] | None = None
) -> Tensor:
    """SemLA's fusion weights: softmax(score / T) over each row's top-k, zero elsewhere.

    Args:
        scores: (B, N), higher = closer.
        top_k: adapters kept per image, >= 1.
        temperature: softmax temperature T > 0 (the original uses 0.05).
        exclude: adapters to leave out (see :func:`topk_indices`).
    Returns:
        (B, N) float64 weights; each row sums to 1.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    top = topk_indices(scores, top_k, exclude)
    chosen = torch.gather(scores.double(), 1, top)
    weights = torch.zeros(scores.shape, dtype=torch.float64, device=scores.device)
    return weights.scatter(1, top, torch.softmax(chosen / temperature, dim=1))


def uniform_weights(
    num_adapters: int, batch: int = 1, exclude: Tensor | Sequence[int] | None = None
) -> Tensor:
    """Equal weights 1/N' over the N' adapters not excluded: (batch, num_adapters) float64."""
    mask = _exclusion_mask(exclude, (batch, num_adapters), torch.device("cpu"))
    keep = (~mask).double()
    counts = keep.sum(dim=1, keepdim=True)
    if (counts == 0).any():
        raise ValueError("every adapter is excluded")
    return keep / counts
