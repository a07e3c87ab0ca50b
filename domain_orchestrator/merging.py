"""Every combination of PEFT's ``add_weighted_adapter``, per image of a batch, on the library's stacks.

PEFT merges weighted LoRA adapters into one new adapter (``add_weighted_adapter(adapters, weights, name,
combination_type=...)``), one merge per call, on a PEFT-wrapped model. This module computes the same
merged adapter for every image of a batch at once (each image its own weight row, so its own merge) on
the stacked factors of an :class:`~.library.AdapterLibrary`, and :func:`merged_library` packs the
results so that :func:`.fusion.fused_adapters` applies image ``b``'s merged adapter to image ``b``::

    merged = merged_library(library, weights, CombinationSpec("ties", density=0.5))   # weights (B, N)
    with fused_adapters(model, merged, torch.eye(B, dtype=torch.float64)):
        outputs = model(images)

Which adapters an image merges: those with a non-zero weight (``active`` may name others), in library
order: image ``b`` gets PEFT's ``add_weighted_adapter([names with w != 0], [their weights], ...)``.
An image without any gets the zero adapter (the base model; PEFT refuses an empty merge).

The merge of one image, for adapters ``i`` with factors ``A_i`` (r_i, in), ``B_i`` (out, r_i), scaling
``s_i`` (``alpha/r`` or ``alpha/sqrt(r)``) and weight ``w_i``, exactly as PEFT defines it (checked against PEFT 0.21.2):

* One adapter: whatever the type, PEFT merges it with ``linear`` (so neither pruning nor SVD).
* ``cat``: ``A' = [w_i s_i A_i]`` stacked along the rank, ``B' = [B_i]``; rank ``sum r_i``; exact
  (it is :func:`.fusion.fused_adapters` itself; provided for completeness, not for speed).
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (equal ranks required):
  act on the A's and the B's *separately*: ``A' = merge_i(a_i, A_i)``, ``B' = merge_i(b_i, B_i)`` with
  ``a_i = sign(w_i s_i) sqrt|w_i s_i|`` and ``b_i = sqrt|w_i s_i|`` (the sign goes on A only), where
  ``merge`` is PEFT's ``task_arithmetic`` (``sum c_i T_i``), ``ties`` (magnitude pruning of each ``T_i`` to
  ``density``, sign election over the pruned ``T_i``, disjoint mean of the weighted ones), ``dare_linear``
  (random pruning with rescale ``1/density``, then the weighted sum), ``dare_ties`` (random pruning and
  rescale, then TIES' election and disjoint mean) or ``magnitude_prune`` (magnitude pruning, weighted sum).
  So ``B'A'`` has cross terms ``b_i a_j B_i A_j``: PEFT's "rough approximation". Rank ``r``.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the same
  merges applied to the full deltas ``D_i = s_i B_i A_i`` (out, in) with weights ``w_i``, then the
  rank-``svd_rank`` (default: the largest ``r_i``) truncated SVD ``D = U S V^T``: ``B' = U S``,
  ``A' = V^T``, optionally clamped to ``[-q, q]``, ``q`` the ``svd_clamp`` quantile of the values of
  ``U S`` and ``V^T`` together.

The merged adapter's scaling is 1 (PEFT sets ``lora_alpha = r``) with one PEFT quirk: the new adapter
copies the first adapter's config, so when that adapter is rsLoRA its scaling is ``r/sqrt(r) = sqrt(r)``;
``CombinationSpec.peft_rslora_scaling`` (default True) reproduces it. The returned factors carry whatever
scaling applies (use them with scaling 1).

How it is computed (per target layer, batched over the images):

* ``svd`` without clamp never forms an out x in matrix: ``D = Bc Ac`` with ``Bc = [w_i s_i B_i]`` (out, K),
  ``Ac = [A_i]`` (K, in), K = sum of ranks; QR ``Bc = Qb Rb`` and ``Ac^T = Qa Ra``, SVD of the small
  ``Rb Ra^T = Us S Vs^T`` gives ``U = Qb Us``, ``V = Qa Vs`` exactly (float64). The truncated product is
  unique, so this equals PEFT's SVD up to rounding (SVD signs do not matter here).
* with ``svd_clamp`` the clamp depends on the signs LAPACK/cuSOLVER give the singular vectors, so the
  full delta is built as PEFT builds it and decomposed by the same ``torch.linalg.svd`` call, image by
  image (same device, same ``svd_driver`` and ``svd_full_matrices``).
* the pruned SVD types need the full pruned deltas (pruning is elementwise): computed once per adapter
  (pruning does not depend on the weights), combined per image, then only the leading ``svd_rank``
  singular triplets are computed (:func:`truncated_svd`: ``eigh`` of the Gram matrix and a
  Rayleigh-Ritz step, 2-4x cheaper than the full SVD, as accurate as float32 SVD itself), image by image
  at each image's own rank so that the result does not depend on the batch. Magnitude pruning finds
  its threshold in a narrow band (:func:`_kth_smallest`, exact, about twice as fast as ``kthvalue``).
* the factor types prune each adapter's A and B once and combine them per image.
* DARE's random masks are drawn, per adapter tensor, from a generator seeded by ``(spec.seed, module,
  adapter name, "A"|"B"|"delta")`` (:func:`dare_mask`): deterministic, and independent of which other
  images or adapters are in the batch (PEFT draws from torch's global RNG instead).

Adapters that do not target a layer take no part in that layer's merge (as in PEFT, which skips them
there, so e.g. TIES' counts and ``cat``'s layout are per layer); a layer none of an image's adapters
targets gets the zero adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .library import ADAPTER_CONFIG, AdapterInfo, AdapterLibrary, LayerStack
from .settings import COMBINATION_TYPES

__all__ = [
    "COMBINATION_TYPES",
    "CombinationSpec",
    "MergedLibrary",
    "check_combination",
    "dare_mask",
    "merge_adapters",
    "merged_library",
    "merged_rank",
    "truncated_svd",
]

#: merged on the A and B factors separately (PEFT requires equal ranks)
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: merged on the full deltas, then a truncated SVD
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")
MAJORITY_SIGN_METHODS = ("total", "frequency")

# combination type -> (pruning of each adapter's tensor, TIES sign election + disjoint mean)
_TREATMENT: dict[str, tuple[str | None, bool]] = {
    "linear": (None, False),
    "svd": (None, False),
    "ties": ("magnitude", True),
    "ties_svd": ("magnitude", True),
    "magnitude_prune": ("magnitude", False),
    "magnitude_prune_svd": ("magnitude", False),
    "dare_linear": ("random", False),
    "dare_linear_svd": ("random", False),
    "dare_ties": ("random", True),
    "dare_ties_svd": ("random", True),
}


@dataclass(frozen=True)
class CombinationSpec:
    """The arguments of PEFT's ``add_weighted_adapter`` besides adapters and weights (same defaults).

    Attributes:
        combination_type: one of :data:`COMBINATION_TYPES`.
        svd_rank: rank of the SVD types' merged adapter; None (or 0): the largest rank merged.
        svd_clamp: quantile in [0, 1] at which the SVD factors are clamped; None: no clamp.
        svd_full_matrices, svd_driver: passed to ``torch.linalg.svd`` (the driver only works on CUDA).
        density: fraction of values the pruning types keep (>= 1: no pruning).
        majority_sign_method: ``total`` or ``frequency`` (TIES' sign election).
        seed: seeds DARE's random masks (:func:`dare_mask`).
        peft_rslora_scaling: give the merged adapter PEFT's scaling ``sqrt(r)`` when the first merged
            adapter is rsLoRA (PEFT copies its config); False: always 1.
    """

    combination_type: str = "svd"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int = 0
    peft_rslora_scaling: bool = True


def check_combination(spec: CombinationSpec, ranks: Sequence[int]) -> str | None:
    """Why PEFT would refuse (or fail) to merge adapters of these ranks with ``spec``; None if it merges.

    Args:
        spec: the combination.
        ranks: the ranks of the adapters to merge, in order.
    Returns:
        None, or the reason in one line (PEFT's own message where PEFT raises one).
    """
    ranks = [int(r) for r in ranks]
    if not ranks:
        return "no adapters to merge (PEFT's add_weighted_adapter needs at least one)"
    if len(ranks) == 1:
        return None  # PEFT merges a single adapter with `linear`, whatever the type and its options
    kind = spec.combination_type
    if kind not in COMBINATION_TYPES:
        return f"Invalid combination_type: {kind}"
    if kind in FACTOR_TYPES and len(set(ranks)) != 1:
        return (
            "All adapters must have the same r value when using combination_type linear, ties, dare_ties "
            f"or dare_linear. (combination_type {kind!r}, ranks {ranks})"
        )
    if kind in SVD_TYPES:
        rank = spec.svd_rank
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
            return f"svd_rank must be an integer or None, got {rank!r}"
        new_rank = rank or max(ranks)
        if new_rank <= 0:
            return f"`r` should be a positive integer value but the value passed is {new_rank}"
        clamp = spec.svd_clamp
        if clamp is not None and not (_is_number(clamp) and 0 <= clamp <= 1):
            return f"quantile() q must be in the range [0, 1] but got {clamp}"
        if spec.svd_driver not in SVD_DRIVERS:
            return f"svd_driver must be one of {SVD_DRIVERS}, got {spec.svd_driver!r}"
    pruning, election = _TREATMENT.get(kind, (None, False))
    if pruning is not None:
        density = spec.density
        if density is None:
            return (
                f"combination_type {kind!r} needs a density (PEFT fails with TypeError: '>=' not supported "
                "between instances of 'NoneType' and 'int')"
            )
        if not _is_number(density) or math.isnan(density):
            return f"density must be a number, got {density!r}"
        if density < 0:
            return f"Density should be >= 0, got {density}"
        if pruning == "random" and density == 0:
            return f"combination_type {kind!r} with density 0 rescales by 1/0 (PEFT's merge is all NaN)"
    if election and spec.majority_sign_method not in MAJORITY_SIGN_METHODS:
        return f'Unimplemented mask method "{spec.majority_sign_method}"'
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def merged_rank(spec: CombinationSpec, ranks: Sequence[int]) -> int:
    """The rank PEFT gives the merged adapter (``r`` of its config) for adapters of these ranks (0 if none)."""
    ranks = [int(r) for r in ranks]
    if not ranks:
        return 0
    kind = "linear" if len(ranks) == 1 else spec.combination_type
    if kind == "cat":
        return sum(ranks)
    if kind in SVD_TYPES:
        return spec.svd_rank or max(ranks)
    return ranks[0]


def dare_mask(
    seed: int, module: str, adapter: str | int, part: str, shape: Sequence[int], density: float
) -> Tensor:
    """DARE's keep-mask for one adapter tensor: each entry kept with probability ``density``.

    Drawn on the CPU from a generator seeded by a hash of ``(seed, module, adapter, part)``, so the same
    on every device and whatever else is merged.

    Args:
        seed: :attr:`CombinationSpec.seed`.
        module: the target layer's name.
        adapter: the adapter's name (or library index).
        part: ``"A"``, ``"B"`` (factor types) or ``"delta"`` (SVD types).
        shape: the tensor's shape (``(r, in)``, ``(out, r)`` or ``(out, in)``).
        density: keep probability.
    Returns:
        a bool tensor of ``shape`` (CPU).
    """
    key = f"{int(seed)}\0{module}\0{adapter}\0{part}".encode()
    state = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    generator = torch.Generator().manual_seed(state)
    return torch.rand(tuple(shape), generator=generator) < density


def _kth_smallest(values: Tensor, k: int) -> Tensor:
    """``values.kthvalue(k).values`` of a flat tensor, found in a narrow band around it.

    The band's bounds come from the quantiles of a fixed random sample; the count below the band says
    which element of the band is the answer, so the result is exact whatever the sample (a band that
    misses it falls back to ``kthvalue`` on everything). About twice as fast as ``kthvalue`` on
    millions of values.
    """
    count = values.numel()
    if count < 1 << 18:
        return values.kthvalue(k).values
    size = 1 << 14
    generator = torch.Generator().manual_seed(count)
    sample = values[torch.randint(count, (size,), generator=generator).to(values.device)].sort().values
    fraction, margin = k / count, 0.02  # the sample quantile's standard deviation is <= 0.004
    low = sample[max(0, int((fraction - margin) * size))]
    high = sample[min(size - 1, int((fraction + margin) * size))]
    below = int(torch.count_nonzero(values < low))
    band = values[(values >= low) & (values <= high)]
    if 1 <= k - below <= band.numel():
        return band.kthvalue(k - below).values
    return values.kthvalue(k).values


def _top_magnitudes(tensor: Tensor, k: int) -> Tensor:
    """The mask of PEFT's magnitude pruning: the ``k`` entries of largest ``|value|`` (``topk``'s choice).

    A ``kthvalue`` threshold gives the same mask several times faster unless values tie at it; then
    ``topk`` itself decides, as in PEFT.
    """
    magnitude = tensor.abs().reshape(-1)
    if k <= 0:
        return torch.zeros_like(tensor, dtype=torch.bool)
    if k >= magnitude.numel():
        return torch.ones_like(tensor, dtype=torch.bool)
    threshold = _kth_smallest(magnitude, magnitude.numel() - k + 1)
    keep = magnitude >= threshold
    if int(torch.count_nonzero(keep)) != k:  # ties at the threshold
        keep = torch.zeros_like(keep)
        keep[magnitude.topk(k).indices] = True
    return keep.reshape(tensor.shape)


def truncated_svd(
    matrix: Tensor, rank: int, *, driver: str | None = None, oversample: int = 8
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``rank`` leading singular triplets of a batch of matrices (g, m, n): ``(U, S, Vh)`` shaped
    (g, m, rank), (g, rank), (g, rank, n), equal to ``torch.linalg.svd``'s up to rounding and the signs
    (or, at equal singular values, the rotation) of the singular vectors.

    A full SVD costs O(m n min(m, n)) with a large constant; only ``rank`` triplets are needed. With
    ``X`` the matrix or its transpose (n <= m): the ``rank + oversample`` leading eigenvectors ``V0`` of
    ``X^T X`` (``eigh``, several times faster than the SVD), then Rayleigh-Ritz on ``X`` itself: ``Q`` =
    orthonormal basis of ``X V0`` and the small SVD of ``Q^T X`` (which also removes the squared
    condition number of the Gram matrix from the leading triplets' accuracy). Small matrices, and an
    explicit ``driver`` (a cuSOLVER choice the caller asked for), go to ``torch.linalg.svd``.
    """
    flip = matrix.shape[-2] < matrix.shape[-1]
    x = matrix.transpose(-2, -1) if flip else matrix  # (g, m, n), n <= m
    n = x.shape[-1]
    width = min(n, rank + oversample)
    if driver is not None or 2 * width >= n:
        u, s, vh = torch.linalg.svd(x, full_matrices=False, driver=driver)
    else:  # matrix by matrix: a batched matmul may round differently, and the result must not
        # depend on which other images share the batch (a nearly flat spectrum amplifies rounding)
        parts = [_leading_triplets(one, width) for one in x.reshape(-1, *x.shape[-2:])]
        u, s, vh = (torch.stack(p).reshape(*x.shape[:-2], *p[0].shape) for p in zip(*parts))
    u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    if flip:  # matrix = X^T = V S U^T
        return vh.transpose(-2, -1), s, u.transpose(-2, -1)
    return u, s, vh


def _leading_triplets(x: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`truncated_svd`'s eigh + Rayleigh-Ritz route for one (m, n) matrix, n <= m."""
    basis = torch.linalg.eigh(x.T @ x).eigenvectors[:, -width:]  # (n, p)
    q = torch.linalg.qr(x @ basis).Q  # (m, p)
    small_u, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)  # (p, p), (p,), (p, n)
    return q @ small_u, s, vh


# --------------------------------------------------------------------------------------------------
# Planning: what PEFT decides per merge (before touching any layer)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """One image's merge: its effective type ("" = nothing to merge), PEFT's rank and scaling."""

    kind: str
    rank: int
    scale: float


def _plan(
    spec: CombinationSpec,
    members: list[int],
    ranks: Sequence[int],
    rslora: Sequence[bool],
    image: int,
    names: Sequence[str | int],
) -> _Plan:
    if not members:
        return _Plan("", 0, 1.0)
    member_ranks = [ranks[i] for i in members]
    reason = check_combination(spec, member_ranks)
    if reason is not None:
        merged = [names[i] for i in members]
        raise ValueError(f"image {image}: cannot merge {merged} with {spec.combination_type!r}: {reason}")
    kind = "linear" if len(members) == 1 else spec.combination_type
    rank = merged_rank(spec, member_ranks)
    scale = math.sqrt(rank) if spec.peft_rslora_scaling and rslora[members[0]] else 1.0
    return _Plan(kind, rank, scale)


def _plans(
    spec: CombinationSpec,
    active: Tensor,
    ranks: Sequence[int],
    rslora: Sequence[bool],
    names: Sequence[str | int],
) -> list[_Plan]:
    rows = enumerate(active.cpu())
    return [_plan(spec, row.nonzero().flatten().tolist(), ranks, rslora, b, names) for b, row in rows]


# --------------------------------------------------------------------------------------------------
# The merge of one layer
# --------------------------------------------------------------------------------------------------


def merge_adapters(
    layer: LayerStack,
    scalings: Tensor | Sequence[float],
    ranks: Sequence[int],
    weights: Tensor,
    spec: CombinationSpec,
    *,
    module: str = "",
    present: Tensor | Sequence[bool] | None = None,
    active: Tensor | None = None,
    use_rslora: Sequence[bool] | None = None,
    adapter_ids: Sequence[str | int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Each image's merged adapter for one layer (scaling 1).

    Args:
        layer: the library's stacks ``A (N, R, in)``, ``B (N, out, R)`` (zero padded to R).
        scalings: (N,) each adapter's LoRA scaling.
        ranks: (N,) each adapter's rank (its config's ``r``).
        weights: (B, N) one weight row per image, or (N,) for one image.
        spec: the combination.
        module: the layer's name (seeds DARE's masks).
        present: (N,) which adapters target this layer (default: all).
        active: (B, N) which adapters each image merges (default: ``weights != 0``).
        use_rslora: (N,) which adapters are rsLoRA (PEFT's merged scaling, see the module doc).
        adapter_ids: (N,) the adapters' names for DARE's masks (default: their indices).
    Returns:
        ``A' (B, r', in)`` and ``B' (B, out, r')`` in the stacks' dtype (without the batch dimension for
        one weight row), r' the largest merged rank of the batch (zero padded), such that
        ``B'[b] @ A'[b]`` is image b's merged delta.
    Raises:
        ValueError: an image whose merge PEFT refuses (:func:`check_combination`), or bad arguments.
    """
    count = layer.A.shape[0]
    w, act = _weights_and_active(weights, active, count)
    ranks = [int(r) for r in ranks]
    if len(ranks) != count:
        raise ValueError(f"ranks must have {count} entries, got {len(ranks)}")
    rslora = [False] * count if use_rslora is None else [bool(x) for x in use_rslora]
    ids = list(range(count)) if adapter_ids is None else list(adapter_ids)
    present_t = (
        torch.ones(count, dtype=torch.bool) if present is None else torch.as_tensor(present, dtype=torch.bool)
    )
    plans = _plans(spec, act, ranks, rslora, ids)
    scal = torch.as_tensor(scalings, dtype=torch.float64).cpu()
    a, b = _merge_layer(layer, scal, ranks, w, act & present_t, plans, spec, module, ids)
    if torch.as_tensor(weights).dim() == 1:
        return a[0], b[0]
    return a, b


def _weights_and_active(weights: Tensor, active: Tensor | None, count: int) -> tuple[Tensor, Tensor]:
    w = torch.as_tensor(weights, dtype=torch.float64).cpu()
    w = w.reshape(1, -1) if w.dim() == 1 else w
    if w.dim() != 2 or w.shape[1] != count:
        raise ValueError(f"weights must be (B, {count}), got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf")
    act = (w != 0) if active is None else torch.as_tensor(active, dtype=torch.bool).cpu().reshape(w.shape)
    return w, act


def _merge_layer(
    layer: LayerStack,
    scal: Tensor,
    ranks: list[int],
    w: Tensor,
    members: Tensor,
    plans: list[_Plan],
    spec: CombinationSpec,
    module: str,
    ids: list,
) -> tuple[Tensor, Tensor]:
    """(A' (B, r', in), B' (B, out, r')) with ``members`` (B, N) the adapters each image merges here."""
    stack_a, stack_b = layer.A, layer.B
    batch = w.shape[0]
    fan_in, fan_out = stack_a.shape[2], stack_b.shape[1]
    groups: dict[str, list[int]] = {}
    for b, plan in enumerate(plans):
        if plan.kind and bool(members[b].any()):
            groups.setdefault(plan.kind, []).append(b)
    parts: list[tuple[list[int], Tensor, Tensor]] = []
    for kind, rows in groups.items():
        job = _Job(
            stack_a, stack_b, scal, ranks, w[rows], members[rows], [plans[b] for b in rows], spec, module, ids
        )
        if kind == "cat":
            a, b = job.cat()
        elif kind in FACTOR_TYPES:
            a, b = job.factors(kind)
        elif kind == "svd" and spec.svd_clamp is None:
            a, b = job.svd_from_factors()
        else:
            a, b = job.svd_from_deltas(kind)
        parts.append((rows, a, b))
    rank = max((a.shape[1] for _, a, _ in parts), default=1)  # rank >= 1: fusion cannot take rank 0
    out_a = stack_a.new_zeros(batch, rank, fan_in)
    out_b = stack_b.new_zeros(batch, fan_out, rank)
    for rows, a, b in parts:
        index = torch.tensor(rows, device=stack_a.device)
        scale = torch.tensor([plans[r].scale for r in rows], dtype=torch.float64, device=b.device)
        out_a[index, : a.shape[1]] = a.to(out_a.dtype)
        out_b[index, :, : b.shape[2]] = (
            b if bool((scale == 1).all()) else b * scale[:, None, None].to(b.dtype)
        ).to(out_b.dtype)
    return out_a, out_b


class _Job:
    """One layer's merge for a group of images that share an effective combination type."""

    def __init__(
        self,
        stack_a: Tensor,
        stack_b: Tensor,
        scal: Tensor,
        ranks: list[int],
        w: Tensor,
        members: Tensor,
        plans: list[_Plan],
        spec: CombinationSpec,
        module: str,
        ids: list,
    ) -> None:
        self.device = stack_a.device
        # full-matrix arithmetic in the library's dtype, as PEFT does it (float32 for half types)
        self.dtype = stack_a.dtype if stack_a.dtype in (torch.float32, torch.float64) else torch.float32
        self.union = members.any(0).nonzero().flatten().tolist()  # adapters any image merges here
        self.rank = max(ranks[i] for i in self.union)
        self.A = stack_a[self.union, : self.rank]  # (n, r, in)
        self.B = stack_b[self.union, :, : self.rank]  # (n, out, r)
        self.ranks = [ranks[i] for i in self.union]
        self.ids = [ids[i] for i in self.union]
        self.scal = scal[self.union]  # (n,) float64
        self.w = w[:, self.union]  # (g, n) float64
        self.members = members[:, self.union]  # (g, n) bool
        self.plans = plans
        self.spec = spec
        self.module = module

    # ---- helpers --------------------------------------------------------------------------------

    def _coef(self, values: Tensor, dtype: torch.dtype) -> Tensor:
        """(g, n) per-image coefficients, zero for adapters an image does not merge, on the device."""
        return (values * self.members).to(device=self.device, dtype=dtype)

    def _slots(self) -> tuple[Tensor, Tensor]:
        """Per image its own adapters, in library order, padded: (g, k) positions in the union and validity."""
        k = int(self.members.sum(1).max())
        order = torch.sort(self.members.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
        valid = torch.gather(self.members, 1, order)
        return order.to(self.device), valid.to(self.device)

    def _prune(self, tensor: Tensor, pruning: str | None, index: int, part: str) -> Tensor:
        """PEFT's ``prune`` of one adapter tensor (magnitude or DARE's random drop with rescale)."""
        density = self.spec.density
        if pruning is None or density >= 1:  # PEFT: density >= 1 prunes nothing (and does not rescale)
            return tensor
        if pruning == "magnitude":
            return tensor * _top_magnitudes(tensor, int(density * tensor.numel()))
        keep = dare_mask(self.spec.seed, self.module, self.ids[index], part, tensor.shape, density)
        return tensor * keep.to(device=tensor.device, dtype=tensor.dtype) / density

    def _combine(self, tensors: Tensor, coef: Tensor, election: bool) -> Tensor:
        """Per image, the weighted sum (or TIES' disjoint mean) of ``tensors`` (n, ...) with ``coef`` (g, n)."""
        g, n = coef.shape
        shape = tensors.shape[1:]
        flat = tensors.reshape(n, -1)
        # Each image sums over its own adapters in adapter order, as PEFT sums its stack: the same float
        # rounding, which matters because a truncated SVD can amplify it (a matmul would round otherwise).
        slots, valid = self._slots()
        coef = torch.gather(coef, 1, slots).to(flat.dtype)  # (g, k), zero on padding
        if not election:
            out = torch.zeros(g, flat.shape[1], dtype=flat.dtype, device=flat.device)
            for j in range(slots.shape[1]):
                out += coef[:, j : j + 1] * flat[slots[:, j]]
            return out.reshape(g, *shape)
        # TIES: each image elects signs over its own (unweighted, pruned) tensors, then averages the
        # weighted ones that agree.
        signs = flat.sign()
        source = flat if self.spec.majority_sign_method == "total" else signs
        vote = torch.zeros(g, flat.shape[1], dtype=flat.dtype, device=flat.device)
        for j in range(slots.shape[1]):
            vote += source[slots[:, j]] * valid[:, j : j + 1]
        majority = torch.where(vote >= 0, 1.0, -1.0).to(flat.dtype)
        del vote
        total = torch.zeros_like(majority)
        kept = torch.zeros_like(majority)
        for j in range(slots.shape[1]):
            index = slots[:, j]
            keep = (signs[index] == majority) & valid[:, j : j + 1]
            total += (coef[:, j : j + 1] * flat[index]) * keep
            kept += keep
        return (total / kept.clamp(min=1.0)).reshape(g, *shape)

    def _ranked(self) -> list[int]:
        return [p.rank for p in self.plans]

    # ---- the combination families ---------------------------------------------------------------

    def cat(self) -> tuple[Tensor, Tensor]:
        """PEFT's ``cat``: A' = [w_i s_i A_i], B' = [B_i] (the weight on A)."""
        g = self.w.shape[0]
        coef = self._coef(self.w * self.scal, self.A.dtype)  # (g, n)
        # per image only its own adapters (padded with zero weights): not the batch's whole union
        order, _ = self._slots()  # (g, k)
        k = order.shape[1]
        a = (self.A[order] * torch.gather(coef, 1, order)[:, :, None, None]).reshape(g, k * self.rank, -1)
        b = self.B[order].permute(0, 2, 1, 3).reshape(g, self.B.shape[1], k * self.rank)
        return a, b

    def factors(self, kind: str) -> tuple[Tensor, Tensor]:
        """``linear`` / ``ties`` / ``dare_*`` / ``magnitude_prune``: merge the A's and the B's separately."""
        pruning, election = _TREATMENT[kind]
        n = len(self.union)
        pruned_a = torch.zeros(n, self.rank, self.A.shape[2], dtype=self.dtype, device=self.device)
        pruned_b = torch.zeros(n, self.B.shape[1], self.rank, dtype=self.dtype, device=self.device)
        for j, r in enumerate(self.ranks):  # each adapter at its own rank (PEFT's tensors), pruned once
            pruned_a[j, :r] = self._prune(self.A[j, :r].to(self.dtype), pruning, j, "A")
            pruned_b[j, :, :r] = self._prune(self.B[j, :, :r].to(self.dtype), pruning, j, "B")
        weighted = self.w * self.scal  # (g, n) float64
        root = weighted.abs().sqrt()
        # PEFT rounds its factors to a float32 tensor (torch.tensor of Python floats)
        coef_a = self._coef(torch.where(weighted >= 0, root, -root).float(), self.dtype)
        coef_b = self._coef(root.float(), self.dtype)
        rank = max(self._ranked())
        a = self._combine(pruned_a[:, :rank], coef_a, election)
        b = self._combine(pruned_b[:, :, :rank], coef_b, election)
        return a, b

    def svd_from_factors(self) -> tuple[Tensor, Tensor]:
        """``svd`` without clamp: the truncated SVD of sum_i w_i s_i B_i A_i from QR of the stacked factors."""
        g, n = self.w.shape
        self._check_rank(min(self.B.shape[1], self.A.shape[2]))
        coef = self._coef(self.w * self.scal, torch.float64)  # (g, n)
        # Per image, only its own adapters (padded with zero coefficients): K = the most any image merges.
        order, _ = self._slots()
        k = order.shape[1]
        down = self.A.double()[order].reshape(g, k * self.rank, -1)  # (g, K, in)
        up = self.B.double()[order] * torch.gather(coef, 1, order)[:, :, None, None]  # (g, k, out, r)
        up = up.permute(0, 2, 1, 3).reshape(g, up.shape[2], k * self.rank)  # (g, out, K)
        q_up, r_up = torch.linalg.qr(up)  # (g, out, ku), (g, ku, K)
        q_down, r_down = torch.linalg.qr(down.transpose(1, 2))  # (g, in, kd), (g, kd, K)
        core = r_up @ r_down.transpose(1, 2)  # (g, ku, kd)
        u, s, vh = torch.linalg.svd(core, full_matrices=False, driver=self.spec.svd_driver)
        rank = min(max(self._ranked()), s.shape[1])
        b = (q_up @ u[:, :, :rank]) * s[:, None, :rank]
        a = vh[:, :rank] @ q_down.transpose(1, 2)
        return self._truncate(a, b)

    def svd_from_deltas(self, kind: str) -> tuple[Tensor, Tensor]:
        """The SVD types on the full deltas: prune/merge them as PEFT does, then its truncated SVD."""
        pruning, election = _TREATMENT[kind]
        deltas = torch.stack(
            [
                self._prune(
                    (self.B[j, :, :r].to(self.dtype) @ self.A[j, :r].to(self.dtype)) * float(self.scal[j]),
                    pruning,
                    j,
                    "delta",
                )
                for j, r in enumerate(self.ranks)
            ]
        )  # (n, out, in): PEFT's get_delta_weight, pruned once per adapter
        coef = self._coef(self.w.float(), self.dtype)  # PEFT: torch.tensor(weights), float32
        delta = self._combine(deltas, coef, election)  # (g, out, in)
        self._check_rank(min(delta.shape[1:]))
        spec = self.spec
        factors = []  # per image (A', B') at its own rank
        for i, plan in enumerate(self.plans):
            if spec.svd_clamp is None:
                # signs do not matter: only the leading triplets, the cheap way, image by image at its own
                # rank so that the result does not depend on the batch's other images
                u, s, vh = truncated_svd(delta[i], min(plan.rank, *delta.shape[1:]), driver=spec.svd_driver)
                factors.append((vh, u * s))
                continue
            # the clamp depends on the singular vectors' signs: PEFT's very call
            u, s, vh = torch.linalg.svd(
                delta[i], full_matrices=spec.svd_full_matrices, driver=spec.svd_driver
            )
            up = u[:, : plan.rank] @ torch.diag(s[: plan.rank])
            down = vh[: plan.rank, :]
            high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), spec.svd_clamp)
            factors.append((down.clamp(-high, high), up.clamp(-high, high)))
        rank = max(a.shape[0] for a, _ in factors)
        a = delta.new_zeros(len(factors), rank, delta.shape[2])
        b = delta.new_zeros(len(factors), delta.shape[1], rank)
        for i, (down, up) in enumerate(factors):
            a[i, : down.shape[0]] = down
            b[i, :, : up.shape[1]] = up
        return a, b

    def _check_rank(self, limit: int) -> None:
        """PEFT's SVD with ``full_matrices=True`` breaks for a rank above min(out, in): refuse it."""
        rank = max(self._ranked())
        if self.spec.svd_full_matrices and rank > limit:
            raise ValueError(
                f"{self.module or 'layer'}: svd_rank {rank} exceeds min(out, in) = {limit} with "
                "svd_full_matrices=True (PEFT's merge fails or builds factors that do not fit); pass "
                f"svd_full_matrices=False to keep rank {limit} there"
            )

    def _truncate(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Zero each image's components beyond its own merged rank (the batch shares the largest)."""
        ranks = torch.tensor(self._ranked(), device=a.device)
        keep = torch.arange(a.shape[1], device=a.device)[None] < ranks[:, None]  # (g, r)
        return a * keep[:, :, None].to(a.dtype), b * keep[:, None, :].to(b.dtype)


# --------------------------------------------------------------------------------------------------
# A library of merged adapters (one per image) for fusion.fused_adapters
# --------------------------------------------------------------------------------------------------


class MergedLibrary(AdapterLibrary):
    """One merged adapter per image (``names`` ``image0, image1, ...``, scalings 1), for :mod:`.fusion`.

    Use with the identity as weights: ``fused_adapters(model, merged, torch.eye(B, dtype=torch.float64))``
    (or :func:`.fusion.fused_text_features`). Extra attributes: ``spec``, ``sources`` (the merged
    library's adapter names) and ``weights`` (B, N).
    """

    def __init__(
        self,
        *,
        infos: Sequence[AdapterInfo],
        layers: dict[str, LayerStack],
        spec: CombinationSpec,
        sources: Sequence[str],
        weights: Tensor,
    ) -> None:
        super().__init__(infos=infos, layers=layers)
        self.spec = spec
        self.sources = list(sources)
        self.weights = weights

    def __repr__(self) -> str:
        return (
            f"MergedLibrary({len(self)} images, {self.spec.combination_type!r} of {len(self.sources)} adapters, "
            f"{len(self.layers)} target layers)"
        )


def _uses_rslora(info: AdapterInfo) -> bool:
    """Whether an adapter is rsLoRA: told by its scaling, or (rank 1, where both agree) by its config."""
    flag = getattr(info, "use_rslora", None)
    if flag is not None:
        return bool(flag)
    if info.rank != 1:
        return math.isclose(info.scaling, info.alpha / math.sqrt(info.rank), rel_tol=1e-9)
    try:
        config = json.loads((Path(info.folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("use_rslora"))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Merge on one CPU thread: many small QR/SVD/top-k calls gain nothing from intra-op threads, and
    their spinning threads stall when the cores are busy (3-4x slower measured on 2 busy cores)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def merged_library(
    library: AdapterLibrary,
    weights: Tensor,
    spec: CombinationSpec,
    names_of_modules: Sequence[str] | None = None,
    *,
    active: Tensor | None = None,
) -> MergedLibrary:
    """Merge the library's adapters per image, as PEFT's ``add_weighted_adapter`` would, for fusion.

    Args:
        library: the adapters (their order = the columns of ``weights``).
        weights: (B, N) one weight row per image (or (N,) for one image).
        spec: the combination.
        names_of_modules: the layers to merge (default: every layer of the library); the others are
            left out (the base model there).
        active: (B, N) which adapters each image merges (default: those with a non-zero weight).
    Returns:
        a :class:`MergedLibrary` whose adapter ``b`` is image ``b``'s merge, on the library's device and
        dtype: ``fused_adapters(model, merged, torch.eye(B, dtype=torch.float64))`` applies it.
    Raises:
        ValueError: bad weights, unknown modules, or an image whose merge PEFT refuses (the message
            names the image and PEFT's reason).
    """
    count = len(library)
    w, act = _weights_and_active(weights, active, count)
    modules = list(library.layers) if names_of_modules is None else list(names_of_modules)
    unknown = [m for m in modules if m not in library.layers]
    if unknown:
        raise ValueError(f"modules not in the library: {unknown[:3]}")
    if not modules:
        raise ValueError("no modules to merge")
    ranks = [info.rank for info in library.infos]
    plans = _plans(spec, act, ranks, [_uses_rslora(info) for info in library.infos], library.names)
    targets = [set(info.target_modules) for info in library.infos]
    scal = library.scalings.to(torch.float64).cpu()
    layers = {}
    with _one_thread():
        for name in modules:
            present = torch.tensor([name in t for t in targets], dtype=torch.bool)
            a, b = _merge_layer(
                library.layers[name], scal, ranks, w, act & present, plans, spec, name, library.names
            )
            layers[name] = LayerStack(a, b)
    infos = []
    for b, plan in enumerate(plans):
        merged = act[b].nonzero().flatten().tolist()
        targeted = tuple(m for m in modules if any(m in targets[i] for i in merged))
        infos.append(
            AdapterInfo(f"image{b}", Path(), plan.rank, float(plan.rank), 1.0, targeted if plan.kind else ())
        )
    return MergedLibrary(infos=infos, layers=layers, spec=spec, sources=library.names, weights=w)
