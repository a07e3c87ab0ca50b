"""CAT-Seg's model presets and builder (registered as ``"CATSeg"``): the one place where the config turns
into CAT-Seg's constructor arguments. ``build_model(cfg)`` (:mod:`.registry`) dispatches to it."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .aggregator import Aggregator
from .cat_seg import CATSeg, CATSegHead, CATSegPredictor
from .clip import CLIP, CLIPConfig
from .registry import build_model, register_model
from .text import load_class_names, prompt_templates

__all__ = [
    "CLIP_NAME_TO_PRESET",
    "MODEL_PRESETS",
    "ModelPreset",
    "build_catseg",
    "build_catseg_model",
    "build_model",
    "model_kwargs_from_cfg",
    "preset_for",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPreset:
    """What a CAT-Seg backbone choice fixes beyond the config's head settings.

    Attributes:
        clip: CLIP hyper-parameters.
        clip_resolution: side of the CLIP input (the released models: 336 for ViT-L/14, 384 for ViT-B/16).
        guidance_layers: CLIP visual blocks feeding the decoder guidance (0-based).
        sliding_kernel, sliding_out_res: sliding-window crop and canvas sides.
        pad_len: class-axis padding of the class attention.
    """

    clip: CLIPConfig
    clip_resolution: int
    guidance_layers: tuple[int, int]
    sliding_kernel: int = 384
    sliding_out_res: int = 640
    pad_len: int = 256


MODEL_PRESETS: dict[str, ModelPreset] = {
    "vitl_336": ModelPreset(
        clip=CLIPConfig(
            embed_dim=768,
            image_size=336,
            vision_layers=24,
            vision_width=1024,
            vision_patch_size=14,
            vision_heads=16,
            context_length=77,
            vocab_size=49408,
            text_width=768,
            text_heads=12,
            text_layers=12,
        ),
        clip_resolution=336,
        guidance_layers=(7, 15),
    ),
    "vitb_384": ModelPreset(
        clip=CLIPConfig(
            embed_dim=512,
            image_size=224,
            vision_layers=12,
            vision_width=768,
            vision_patch_size=16,
            vision_heads=12,
            context_length=77,
            vocab_size=49408,
            text_width=512,
            text_heads=8,
            text_layers=12,
        ),
        clip_resolution=384,
        guidance_layers=(3, 7),
    ),
    # A few layers of width 32-64 on 32 px inputs (4 x 4 token grid): for tests, demos and smoke runs.
    "tiny": ModelPreset(
        clip=CLIPConfig(
            embed_dim=32,
            image_size=32,
            vision_layers=3,
            vision_width=64,
            vision_patch_size=8,
            vision_heads=2,
            context_length=77,
            vocab_size=49408,
            text_width=32,
            text_heads=2,
            text_layers=2,
        ),
        clip_resolution=32,
        guidance_layers=(0, 1),
        sliding_kernel=24,
        sliding_out_res=40,
        pad_len=32,
    ),
}
# The demo's model (configs/demo/): the tiny towers on 64-px inputs, an 8 x 8 token grid (32 x 32 logits).
MODEL_PRESETS["tiny_64"] = ModelPreset(
    clip=dataclasses.replace(MODEL_PRESETS["tiny"].clip, image_size=64),
    clip_resolution=64,
    guidance_layers=(0, 1),
    sliding_kernel=48,
    sliding_out_res=80,
    pad_len=32,
)

#: ``MODEL.SEM_SEG_HEAD.CLIP_PRETRAINED`` value -> preset name.
CLIP_NAME_TO_PRESET = {
    "ViT-L/14@336px": "vitl_336",
    "ViT-B/16": "vitb_384",
    "tiny": "tiny",
    "tiny-64": "tiny_64",
}


def preset_for(clip_pretrained: str) -> ModelPreset:
    """The preset selected by ``MODEL.SEM_SEG_HEAD.CLIP_PRETRAINED`` (or a preset name)."""
    name = CLIP_NAME_TO_PRESET.get(clip_pretrained, clip_pretrained)
    if name not in MODEL_PRESETS:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.CLIP_PRETRAINED {clip_pretrained!r} is not supported; "
            f"choose one of {sorted(CLIP_NAME_TO_PRESET)}"
        )
    return MODEL_PRESETS[name]


def _resolve(path: str) -> Path:
    from ..config import resolve_catseg_path

    return resolve_catseg_path(path)


def model_kwargs_from_cfg(cfg: Any) -> dict[str, Any]:
    """The constructor arguments of :func:`build_catseg` that a detectron2-style config fixes."""
    head = cfg.MODEL.SEM_SEG_HEAD
    if int(head.PROMPT_DEPTH) != 0 or int(head.PROMPT_LENGTH) != 0:
        raise ValueError("visual prompt tuning (MODEL.SEM_SEG_HEAD.PROMPT_DEPTH/LENGTH > 0) is not supported")
    return {
        "preset": preset_for(head.CLIP_PRETRAINED),
        "templates": prompt_templates(cfg.MODEL.PROMPT_ENSEMBLE_TYPE),
        "aggregator": {
            "text_guidance_dim": head.TEXT_GUIDANCE_DIM,
            "text_guidance_proj_dim": head.TEXT_GUIDANCE_PROJ_DIM,
            "appearance_guidance_dim": head.APPEARANCE_GUIDANCE_DIM,
            "appearance_guidance_proj_dim": head.APPEARANCE_GUIDANCE_PROJ_DIM,
            "decoder_dims": tuple(head.DECODER_DIMS),
            "decoder_guidance_dims": tuple(head.DECODER_GUIDANCE_DIMS),
            "decoder_guidance_proj_dims": tuple(head.DECODER_GUIDANCE_PROJ_DIMS),
            "num_layers": head.NUM_LAYERS,
            "heads": head.NUM_HEADS,
            "hidden_dim": head.HIDDEN_DIMS,
            "pooling_size": tuple(head.POOLING_SIZES),
            "feature_resolution": tuple(head.FEATURE_RESOLUTION),
            "window": head.WINDOW_SIZES,
            "attention_type": head.ATTENTION_TYPE,
        },
        "ignore_value": head.IGNORE_VALUE,
        "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
        "clip_pixel_mean": tuple(cfg.MODEL.CLIP_PIXEL_MEAN),
        "clip_pixel_std": tuple(cfg.MODEL.CLIP_PIXEL_STD),
        "size_divisibility": cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
        "sliding_window": bool(cfg.TEST.SLIDING_WINDOW),
        "clip_finetune": head.CLIP_FINETUNE,
    }


def build_catseg(
    *,
    preset: ModelPreset,
    templates: list[str],
    aggregator: dict[str, Any],
    train_class_names: list[str] | None = None,
    test_class_names: list[str] | None = None,
    ignore_value: int = 255,
    clip_finetune: str = "attention",
    **kwargs: Any,
) -> CATSeg:
    """Assemble a randomly initialised CAT-Seg from already-resolved arguments."""
    clip = CLIP(preset.clip)
    transformer = Aggregator(prompt_channels=len(templates), pad_len=preset.pad_len, **aggregator)
    head = CATSegHead(
        predictor=CATSegPredictor(clip_model=clip, transformer=transformer, templates=templates),
        ignore_value=ignore_value,
    )
    c4, c5 = aggregator.get("decoder_guidance_dims", (256, 128))
    width = preset.clip.vision_width
    model = CATSeg(
        sem_seg_head=head,
        upsample1=nn.ConvTranspose2d(width, c4, kernel_size=2, stride=2),
        upsample2=nn.ConvTranspose2d(width, c5, kernel_size=4, stride=4),
        guidance_layers=preset.guidance_layers,
        clip_resolution=preset.clip_resolution,
        sliding_kernel=preset.sliding_kernel,
        sliding_out_res=preset.sliding_out_res,
        context_length=preset.clip.context_length,
        train_class_names=train_class_names or (),
        test_class_names=test_class_names or (),
        **kwargs,
    )
    model.mark_trainable(clip_finetune)
    return model


def set_config_vocabularies(model: nn.Module, cfg: Any) -> None:
    """Give ``model`` the config's train and test vocabularies (``MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON`` /
    ``TEST_CLASS_JSON``, relative paths against ``catseg/``). Call it outside a device context: the tokenizer
    builds its tensors on the default device."""
    head = cfg.MODEL.SEM_SEG_HEAD
    model.set_class_names(
        train=load_class_names(_resolve(head.TRAIN_CLASS_JSON)),
        test=load_class_names(_resolve(head.TEST_CLASS_JSON)),
    )


@register_model("CATSeg", architecture=model_kwargs_from_cfg)
def build_catseg_model(cfg: Any, device: str | torch.device = "cpu", *, class_names: bool = True) -> CATSeg:
    """Build CAT-Seg from a config on ``device`` (random weights; load a checkpoint afterwards).

    The builder of ``MODEL.META_ARCHITECTURE: "CATSeg"``; call it through :func:`build_model` (same
    arguments). Returns the model in training mode, with CAT-Seg's ``CLIP_FINETUNE`` trainability applied.
    """
    kwargs = model_kwargs_from_cfg(cfg)
    with torch.device(device):
        model = build_catseg(**kwargs)
    if class_names:
        set_config_vocabularies(model, cfg)
    logger.info(
        "built CAT-Seg (%s) with %.1fM parameters on %s",
        cfg.MODEL.SEM_SEG_HEAD.CLIP_PRETRAINED,
        sum(p.numel() for p in model.parameters()) / 1e6,
        device,
    )
    return model
