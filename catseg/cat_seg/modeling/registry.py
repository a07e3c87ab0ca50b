"""The model registry: ``MODEL.META_ARCHITECTURE`` -> the function that builds that model from a config.

A model family registers its builder once, where it is defined::

    @register_model("CATSeg")
    def build_catseg_model(cfg, device="cpu", *, class_names=True): ...

and every tool builds models through :func:`build_model`, which dispatches on the config's
``MODEL.META_ARCHITECTURE``. What the rest of the code needs from a built model is written down in
:class:`cat_seg.modeling.interface.SegmentationModel` (and ``docs/model_interface.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn


class ModelBuilder(Protocol):
    """``builder(cfg, device, *, class_names) -> model``: what :func:`register_model` registers.

    The builder allocates the model on ``device`` (``"meta"``: shapes only), with random weights (a
    checkpoint is loaded afterwards), in training mode; with ``class_names`` it also sets the config's
    train and test vocabularies.
    """

    def __call__(
        self, cfg: Any, device: str | torch.device = "cpu", *, class_names: bool = True
    ) -> nn.Module: ...


#: ``MODEL.META_ARCHITECTURE`` -> builder. Filled by :func:`register_model` (``"CATSeg"`` and ``"SAN"``, when
#: :mod:`cat_seg.modeling` is imported).
MODEL_REGISTRY: dict[str, ModelBuilder] = {}
#: ``MODEL.META_ARCHITECTURE`` -> ``cfg -> dict``: everything of a config the builder reads, class names aside.
_ARCHITECTURES: dict[str, Callable[[Any], dict[str, Any]]] = {}


def register_model(
    name: str, *, architecture: Callable[[Any], dict[str, Any]] | None = None
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register a builder under the ``MODEL.META_ARCHITECTURE`` value ``name``.

    Args:
        name: the ``MODEL.META_ARCHITECTURE`` value.
        architecture: ``cfg -> dict`` of every setting the builder reads, class names aside (two configs
            with equal dicts build the same model, so the orchestrator builds it once for both); None: the
            whole ``MODEL`` tree stands for it (two configs share a model only when it is equal).
    Raises:
        ValueError: ``name`` is empty or already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in MODEL_REGISTRY:
            raise ValueError(f"MODEL.META_ARCHITECTURE {name!r} is already registered")
        MODEL_REGISTRY[name] = builder
        if architecture is not None:
            _ARCHITECTURES[name] = architecture
        return builder

    return decorator


def unregister_model(name: str) -> None:
    """Remove a registered builder (e.g. a test's toy model).

    Raises:
        KeyError: ``name`` is not registered.
    """
    del MODEL_REGISTRY[name]
    _ARCHITECTURES.pop(name, None)


def model_architecture(cfg: Any) -> dict[str, Any]:
    """What :func:`build_model` builds from ``cfg``, class names aside: ``MODEL.META_ARCHITECTURE`` and the
    settings its registered ``architecture`` function reads (or the whole ``MODEL`` tree)."""
    name = cfg.MODEL.META_ARCHITECTURE
    describe = _ARCHITECTURES.get(name)
    settings = describe(cfg) if describe is not None else {"MODEL": repr(cfg.MODEL)}
    return {"META_ARCHITECTURE": name, **settings}


def build_model(cfg: Any, device: str | torch.device = "cpu", *, class_names: bool = True) -> nn.Module:
    """Build the model that ``cfg.MODEL.META_ARCHITECTURE`` names on ``device`` (random weights; load a
    checkpoint afterwards).

    Args:
        cfg: a config from :func:`cat_seg.config.load_config`.
        device: where to allocate; ``"meta"`` builds shapes only (no memory), e.g. to check ViT-L names.
        class_names: read ``MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON`` / ``TEST_CLASS_JSON`` (relative paths
            resolve against the ``catseg/`` folder) and tokenise them.
    Returns:
        the model in training mode (CAT-Seg: with its ``CLIP_FINETUNE`` trainability applied).
    Raises:
        ValueError: ``MODEL.META_ARCHITECTURE`` is not registered (the message names the registered ones).
    """
    name = cfg.MODEL.META_ARCHITECTURE
    builder = MODEL_REGISTRY.get(name)
    if builder is None:
        raise ValueError(
            f"MODEL.META_ARCHITECTURE {name!r} is not a registered model; "
            f"choose one of {sorted(MODEL_REGISTRY)}"
        )
    return builder(cfg, device, class_names=class_names)
