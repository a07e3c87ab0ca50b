"""The fused multi-adapter LoRA forward (the weights come from :mod:`domain_orchestrator.retrieval`).

:func:`fused_adapters` makes every targeted ``nn.Linear`` of a model compute, for each image ``b`` of
the batch::

    y = W x + bias + sum_i weights[b, i] * s_i * B_i (A_i x)          (s_i = alpha_i / r_i)

which is what PEFT's ``add_weighted_adapter(names, weights, combination_type="cat")`` followed by
``set_adapter`` computes for one image (the original code's merge), but for a whole batch with a different weight
vector per image, without creating, merging or deleting any module, and touching only the adapters
with non-zero weight. Parameters are never modified, so the model is exactly as before on exit.

Which rows belong to which image: every targeted layer of CAT-Seg sees its input with the images
outermost (views, classes, windows or pixels of image 0 first, then image 1, ...), so a layer input of
leading size ``n`` splits into ``B`` equal, contiguous blocks. Text features computed per image follow
the same rule when the prompts are repeated per image (:func:`fused_text_features`).
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .library import AdapterLibrary

logger = logging.getLogger(__name__)

FusionMode = Literal["auto", "merged", "unmerged"]

# --------------------------------------------------------------------------------------------------
# The fused forward
# --------------------------------------------------------------------------------------------------


class _LayerFusion:
    """Per-image LoRA factors of one Linear layer for the adapters active in the batch.

    With ``idx`` (B, K) the active adapters of each image (padded with zero coefficients) and the
    library's stacks, image b uses ``down = A[idx[b]]`` (K*R, in) and ``up = B[idx[b]] * coef`` (out, K*R),
    so that its delta is ``up @ down``.
    """

    def __init__(self, stack, idx: Tensor, coef: Tensor, mode: FusionMode) -> None:  # noqa: ANN001
        self.stack = stack
        self.idx = idx  # (B, K) long
        self.coef = coef  # (B, K) weights * scaling
        self.mode = mode
        self._factors: dict[tuple[torch.dtype, bool], tuple[Tensor, Tensor]] = {}

    def factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(down (B, K*R, in), up (B, out, K*R)) in ``dtype``.

        Gathered once per block (per dtype and inference mode) and reused: CAT-Seg calls its aggregator
        layers once per chunk of rows, many times per forward. Not cached when they take part in autograd.
        """
        key = (dtype, torch.is_inference_mode_enabled())
        if key in self._factors:
            return self._factors[key]
        batch, k = self.idx.shape
        rank = self.stack.A.shape[1]
        down = self.stack.A[self.idx].reshape(batch, k * rank, -1).to(dtype)  # (B, K*R, in)
        up = self.stack.B[self.idx]  # (B, K, out, R)
        up = up * self.coef[:, :, None, None].to(up.dtype)
        up = up.permute(0, 2, 1, 3).reshape(batch, up.shape[2], k * rank).to(dtype)  # (B, out, K*R)
        if not (down.requires_grad or up.requires_grad):
            self._factors[key] = (down, up)
        return down, up

    def __call__(self, layer: nn.Linear, x: Tensor) -> Tensor:
        batch = self.idx.shape[0]
        lead = x.shape[0]
        if lead % batch:
            raise RuntimeError(
                f"fused LoRA: a layer input of leading size {lead} cannot be split over {batch} images "
                "(pass one weight row per image; compute class-text features for a batch with "
                "fused_text_features() and give them to the model)"
            )
        down, up = self.factors(x.dtype)
        rows, fan_in, fan_out = x.numel() // (batch * x.shape[-1]), layer.in_features, layer.out_features
        # Merging costs out*in*rank per image, the low-rank path rows*rank*(in+out): take the cheaper.
        merged = self.mode == "merged" or (
            self.mode == "auto" and rows * (fan_in + fan_out) > fan_in * fan_out
        )
        if merged and batch == 1:
            # One image: exactly the zero-shot kernel (bias fused) on the merged weight.
            return F.linear(x, torch.addmm(layer.weight, up[0], down[0]), layer.bias)
        xb = x.reshape(batch, -1, x.shape[-1])  # (B, m, in): rows of image b are contiguous
        if merged:
            weight = torch.baddbmm(layer.weight.expand(batch, -1, -1), up, down)  # (B, out, in)
            if layer.bias is None:
                y = torch.bmm(xb, weight.transpose(1, 2))
            else:  # bias fused into the batched product, as F.linear fuses it
                y = torch.baddbmm(layer.bias.expand(batch, 1, -1), xb, weight.transpose(1, 2))
        else:
            low_rank = torch.bmm(torch.bmm(xb, down.transpose(1, 2)), up.transpose(1, 2))  # (B, m, out)
            y = F.linear(xb, layer.weight, layer.bias) + low_rank
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _active(weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per image, the adapters with non-zero weight, padded to the same count.

    Returns:
        idx (B, K) long and w (B, K) weights (0 on padding), K = the largest count in the batch.
    """
    nonzero = weights != 0
    k = max(int(nonzero.sum(dim=1).max()), 1)
    # Sort non-zero entries first (stable, so library order within each image).
    order = torch.sort(nonzero.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    return order, torch.gather(weights, 1, order) * torch.gather(nonzero, 1, order)


@contextlib.contextmanager
def fused_adapters(
    model: nn.Module, library: AdapterLibrary, weights: Tensor, *, mode: FusionMode = "auto"
) -> Iterator[None]:
    """Fuse weighted library adapters into ``model``'s forward for the duration of the block.

    Args:
        model: the base model (its targeted layers must be plain ``nn.Linear``; not PEFT-wrapped).
        library: adapters whose target names are module names of ``model``.
        weights: (B, N) one weight vector per image of the batch (or (N,) for one image); zero = unused.
        mode: ``merged`` (per image, W + delta then one matmul), ``unmerged`` (W x plus the low-rank
            terms) or ``auto`` (per layer and call, whichever costs fewer multiply-adds).
    Yields:
        nothing; call the model inside the block with a batch of exactly B images.
    """
    if mode not in ("auto", "merged", "unmerged"):
        raise ValueError(f"mode must be auto, merged or unmerged, got {mode!r}")
    weights = torch.as_tensor(weights, dtype=torch.float64)
    weights = weights.reshape(1, -1) if weights.dim() == 1 else weights
    if weights.dim() != 2 or weights.shape[1] != len(library):
        raise ValueError(f"weights must be (B, {len(library)}), got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError("weights contain NaN or Inf")
    modules = dict(model.named_modules())
    missing = [name for name in library.layers if name not in modules]
    if missing:
        raise ValueError(f"the model has no module(s) {missing[:3]} that the library targets")
    device = library.device
    idx, w = _active(weights.to(device))
    coef = w * library.scalings.to(device)[idx]
    patched: list[nn.Module] = []
    try:
        if (w != 0).any():
            for name, stack in library.layers.items():
                layer = modules[name]
                if type(layer) is not nn.Linear:
                    raise TypeError(
                        f"{name}: fused adapters need a plain nn.Linear, got {type(layer).__name__}"
                    )
                if "forward" in layer.__dict__:
                    raise RuntimeError(
                        f"{name}: already inside a fused_adapters block (nesting is not supported)"
                    )
                fusion = _LayerFusion(stack, idx, coef, mode)
                layer.forward = types.MethodType(lambda self, x, _f=fusion: _f(self, x), layer)
                patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward


def fused_text_features(model: nn.Module, library: AdapterLibrary, weights: Tensor, **kwargs) -> Tensor:
    """Class-text features under each image's fused adapters (the ``per_image`` text policy).

    The prompts are encoded once per image, in one batch, with that image's weights.

    Args:
        model: a CAT-Seg model (uses its current vocabulary).
        weights: (B, N).
    Returns:
        (B, T, P, C) normalised text features.
    """
    weights = torch.as_tensor(weights)
    weights = weights.reshape(1, -1) if weights.dim() == 1 else weights
    tokens = model.class_tokens
    batch = weights.shape[0]
    repeated = tokens.repeat(batch, 1, 1)  # (B*T, P, L), image-major
    with fused_adapters(model, library, weights, **kwargs):
        feats = model.text_features(repeated)  # (B*T, P, C)
    return feats.reshape(batch, tokens.shape[0], *feats.shape[1:])
