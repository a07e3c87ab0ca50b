"""SemLA's per-image step, in one place: retrieve -> fuse -> predict (-> evaluate, by the caller).

::

    weights = retrieve(embeddings, prototypes, semla)        # (B, N): each image's top-k softmax weights
    outputs = segment(model, library, batch, weights)        # each image through its own fused adapters
    kept_adapters(weights[b], library.names)                 # {adapter: weight} of image b, best first

:func:`semla_step` is those lines for a batch of images with their embeddings; ``experiments.py``
(:mod:`domain_orchestrator.loop`), ``demo.py`` and the web demo (:mod:`semla_demo.inference`) and the demo
report all predict through :func:`segment`, and weight images through :func:`retrieve`.

Test-time augmentation (``segment(..., tta=...)``, ``experiments.py --tta``, ``demo.py --tta``): the weights
stay those of the original image (retrieved once, from its embedding), the class-text features are
computed once, and every view of the batch goes through the same fused adapters
(:func:`cat_seg.test_time_augmentation.predict_with_tta` inside one :func:`fused_adapters` block).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from cat_seg.test_time_augmentation import TTASettings, predict_with_tta

from .fusion import fused_adapters, fused_text_features
from .retrieval import scores, semla_weights

__all__ = ["kept_adapters", "retrieve", "segment", "semla_step"]


def retrieve(
    embeddings: Tensor,
    prototypes: Tensor,
    semla: Any,
    *,
    exclude: Sequence[int] | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
) -> Tensor:
    """Retrieval: (B, D) image embeddings -> (B, N) weights over the N prototypes' adapters (float64).

    Args:
        embeddings: the images' embeddings, made by the embedder that made ``prototypes``.
        prototypes: (N, D) the domains' mean embeddings.
        semla: a :class:`~domain_orchestrator.settings.SemlaConfig` (measure, top_k, temperature).
        exclude: columns never kept (``--remove_target_adapter``).
        top_k, temperature: override the config's.
    """
    s = scores(embeddings.double(), prototypes.double(), semla.measure)
    k = semla.top_k if top_k is None else top_k
    t = semla.temperature if temperature is None else temperature
    return semla_weights(s, k, t, exclude=exclude)


def segment(
    model: Any,
    library: Any,
    batch: list[dict[str, Any]],
    weights: Tensor | None,
    *,
    text_features: Tensor | None = None,
    tta: TTASettings | None = None,
) -> list[dict[str, Tensor]]:
    """Fuse and predict: each image of ``batch`` through the base model plus its row of ``weights``.

    Args:
        model: the segmentation model (base weights).
        library: the :class:`~domain_orchestrator.library.AdapterLibrary` the weights index.
        batch: the model's inputs (one dict per image).
        weights: (B, N) one row per image, (1, N) shared by the batch, or None for the base model alone.
        text_features: the class-text features to use; None computes them (under each image's adapters),
            once for all test-time views.
        tta: test-time augmentation: every view of the batch predicted with the same adapters, weights and
            text features, the views' probabilities averaged (None: one forward pass).
    Returns:
        the model's outputs, ``[{"sem_seg": (T, H, W)}, ...]``.
    """
    if weights is None:
        text = model.text_features() if text_features is None else text_features
        return predict_with_tta(lambda views: model(views, text_features=text), batch, tta)
    if text_features is None:
        text_features = fused_text_features(model, library, weights)
    with fused_adapters(model, library, weights):
        return predict_with_tta(lambda views: model(views, text_features=text_features), batch, tta)


def kept_adapters(row: Tensor, names: Sequence[str]) -> Mapping[str, float]:
    """``{adapter: weight}`` of one image's weight row: the kept ones (> 0), best first, ties in library order."""
    order = torch.sort(-row, stable=True).indices
    return {names[int(i)]: float(row[i]) for i in order if row[i] > 0}


def semla_step(
    model: Any,
    library: Any,
    prototypes: Tensor,
    semla: Any,
    batch: list[dict[str, Any]],
    embeddings: Tensor,
    **retrieval: Any,
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """SemLA on a batch: retrieve each image's adapters from its embedding, fuse them, predict.

    Returns:
        the (B, N) weights and the model's outputs (score them with an evaluator).
    """
    weights = retrieve(embeddings, prototypes, semla, **retrieval)
    return weights, segment(model, library, batch, weights)
