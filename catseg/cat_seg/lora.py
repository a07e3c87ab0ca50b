"""Which modules of a CAT-Seg model LoRA adapters address.

SemLA trains PEFT LoRA adapters on an explicit list of module paths (``MODEL.LORA.MODUELS``, 214 names
for CAT-Seg ViT-L/14@336px). :func:`resolve_target_modules` checks such a list against a built model,
or derives the equivalent selection for any preset when the list is empty.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .config import reference_lora_target_modules


def semla_target_modules(model: nn.Module) -> list[str]:
    """The reference's LoRA selection for this model's depth.

    CLIP visual and text blocks (attn ``q_proj``/``k_proj``/``v_proj``, mlp ``c_fc``/``c_proj``) and the
    aggregator layers (swin ``q``/``k``/``v``/``proj``/``fc1``/``fc2``, class attention ``q``/``k``/``v``,
    ``MLP.0``/``MLP.2``), in the reference's order. For the ``vitl_336`` preset this is exactly the
    reference's 214-name list.
    """
    predictor = model.sem_seg_head.predictor
    return list(
        reference_lora_target_modules(
            num_visual_layers=len(predictor.clip_model.visual.transformer.resblocks),
            num_text_layers=len(predictor.clip_model.transformer.resblocks),
            num_aggregator_layers=len(predictor.transformer.layers),
        )
    )


def resolve_target_modules(names: Sequence[str], model: nn.Module) -> list[str]:
    """Check LoRA target names against a model (or derive them when ``names`` is empty).

    Args:
        names: full module paths relative to the CAT-Seg model (``MODEL.LORA.MODUELS``); empty = the
            reference's selection for this model (:func:`semla_target_modules`).
        model: the CAT-Seg model the adapters attach to (PEFT-wrapped layers are accepted).
    Returns:
        the target names, each an ``nn.Linear`` of ``model``.
    Raises:
        ValueError: names the model does not have, or that are not Linear layers.
    """
    names = list(names) if names else semla_target_modules(model)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(
            f"{len(missing)} LoRA target module(s) do not exist in this model "
            f"(e.g. {', '.join(missing[:3])}); MODEL.LORA.MODUELS must match the model preset "
            "(an empty list selects the reference's modules for any preset)"
        )
    not_linear = [
        n for n in names if not isinstance(getattr(modules[n], "base_layer", modules[n]), nn.Linear)
    ]
    if not_linear:
        raise ValueError(f"LoRA target modules must be nn.Linear layers: {', '.join(not_linear[:5])}")
    return names
