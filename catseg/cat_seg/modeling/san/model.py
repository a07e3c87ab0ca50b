"""SAN (Side Adapter Network, Xu et al., CVPR 2023) on the project's engine, registered as ``"SAN"``.

A frozen CLIP is split in two: the first blocks run once on the down-scaled image
(:class:`~.clip_parts.FeatureExtractor`); the side adapter (:mod:`.side_adapter`) reads their features and
predicts mask proposals and attention biases; the remaining CLIP blocks turn the proposals into mask
embeddings (:class:`~.clip_parts.RecWithAttnbiasHead`), which the text classifier scores. The semantic map is
``softmax(class logits)[:-1] x sigmoid(masks)`` summed over the queries.

Inputs and outputs follow the project's model interface (``docs/model_interface.md``): a list of dicts with
``"image"`` (3, H, W) RGB 0-255, optional ``"height"``/``"width"``, ``"sem_seg"`` (H, W) train ids for
training. Eval returns one ``{"sem_seg": (T, height, width)}`` per input (scores >= 0, a sum over the
queries of class probability times mask probability); training returns SAN's weighted loss terms.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cat_seg import pad_batch, sem_seg_postprocess
from ..clip import CLIP, CLIPConfig
from ..text import tokenize_class_names
from .clip_parts import (
    FeatureExtractor,
    LearnableBgOvClassifier,
    RecWithAttnbiasHead,
    pack_attention_state_dicts,
)
from .criterion import SetCriterion
from .side_adapter import RegionwiseSideAdapterNetwork

logger = logging.getLogger(__name__)


class SAN(nn.Module):
    """SAN.

    Args:
        clip: the CLIP model (split between the three CLIP modules; its parameters are theirs).
        side_adapter_network: the side adapter.
        criterion: the training loss.
        num_extract_layers: CLIP blocks of the feature extractor.
        num_queries: mask proposals.
        templates: prompt templates (the 14 "vild" templates in the original).
        clip_scale: CLIP input scale relative to the padded image (0.5 for ViT-B/16, 0.7 for ViT-L/14).
        size_divisibility: padding multiple of the input batch (32).
        pixel_mean, pixel_std: CLIP normalisation in 0-255 units.
        rec_downsample: how the attention bias is resized to the CLIP grid (``max``).
        postprocess_before_inference: resize the masks to the output size before combining them with
            the class probabilities (``MODEL.SAN.SEM_SEG_POSTPROCESS_BEFORE_INFERENCE``, True).
        train_class_names, test_class_names: vocabularies.
        ignore_value: the ignore label of training ``sem_seg`` maps.
    """

    def __init__(
        self,
        *,
        clip: CLIP,
        side_adapter_network: RegionwiseSideAdapterNetwork,
        criterion: SetCriterion,
        num_extract_layers: int,
        num_queries: int,
        templates: Sequence[str],
        clip_scale: float = 0.5,
        size_divisibility: int = 32,
        pixel_mean: Sequence[float] = (122.7709383, 116.7460125, 104.09373615),
        pixel_std: Sequence[float] = (68.5005327, 66.6321579, 70.3231630),
        rec_downsample: str = "max",
        postprocess_before_inference: bool = True,
        train_class_names: Sequence[str] = (),
        test_class_names: Sequence[str] = (),
        ignore_value: int = 255,
    ) -> None:
        super().__init__()
        # Registration order = the original state dict's order (inside a CLIP block ours lists attn, ln_1,
        # mlp, ln_2; open_clip ln_1, attn, ln_2, mlp: loading goes by name).
        self.criterion = criterion
        self.side_adapter_network = side_adapter_network
        self.clip_visual_extractor = FeatureExtractor(clip, num_extract_layers)
        self.clip_rec_head = RecWithAttnbiasHead(clip, num_extract_layers, num_queries, rec_downsample)
        self.ov_classifier = LearnableBgOvClassifier(clip)
        pack_attention_state_dicts(self)
        # The whole CLIP, for the interface (``clip_model``): not a child module, its parameters are
        # registered above under the original names.
        self._clip = (clip,)
        self.templates = list(templates)
        self.clip_scale = float(clip_scale)
        self.size_divisibility = int(size_divisibility)
        self.postprocess_before_inference = bool(postprocess_before_inference)
        self.ignore_value = int(ignore_value)
        self._sliding_window = False
        for name, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
            self.register_buffer(
                name, torch.tensor(value, dtype=torch.float32).view(-1, 1, 1), persistent=False
            )
        self.train_class_names: list[str] = []
        self.test_class_names: list[str] = []
        length = clip.context_length
        self.register_buffer("train_tokens", torch.zeros(0, 1, length, dtype=torch.int64), persistent=False)
        self.register_buffer("test_tokens", torch.zeros(0, 1, length, dtype=torch.int64), persistent=False)
        if train_class_names or test_class_names:
            self.set_class_names(
                train=train_class_names or test_class_names, test=test_class_names or train_class_names
            )

    # -- the model interface ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def clip_model(self) -> CLIP:
        """The whole CLIP (its image tower gives the retrieval embedding of the ``catseg`` embedder)."""
        return self._clip[0]

    @property
    def clip_resolution(self) -> int:
        """CLIP's pre-training input side (the retrieval embedding's resolution)."""
        return int(self.clip_model.visual.image_size)

    @property
    def clip_pixel_mean(self) -> Tensor:
        return self.pixel_mean

    @property
    def clip_pixel_std(self) -> Tensor:
        return self.pixel_std

    @property
    def sliding_window(self) -> bool:
        """Always False: SAN predicts on the whole image (the original has no sliding-window path)."""
        return False

    @sliding_window.setter
    def sliding_window(self, value: bool) -> None:
        if value and not self._sliding_window:
            logger.info(
                "TEST.SLIDING_WINDOW is ignored by SAN: it predicts on the whole image, as the original"
            )
        self._sliding_window = bool(value)

    @property
    def class_tokens(self) -> Tensor:
        """(T, P, L) prompt tokens of the current mode's vocabulary."""
        return self.train_tokens if self.training else self.test_tokens

    def set_class_names(
        self, *, train: Sequence[str] | None = None, test: Sequence[str] | None = None
    ) -> None:
        """Set the vocabularies and tokenise their prompts (a name's first ``", "`` synonym, as CAT-Seg)."""
        length = self.train_tokens.shape[-1]
        if train is not None:
            self.train_class_names = list(train)
            self.train_tokens = tokenize_class_names(train, self.templates, length).to(self.device)
        if test is not None:
            self.test_class_names = list(test)
            self.test_tokens = tokenize_class_names(test, self.templates, length).to(self.device)

    def text_features(self, tokens: Tensor | None = None) -> Tensor:
        """(T, P, L) tokens (default: the current vocabulary's) -> (T, P, C) normalised per-prompt features."""
        if tokens is None:
            tokens = self.class_tokens
        if tokens.shape[0] == 0:
            raise RuntimeError("no class names set: call set_class_names() or build the model from a config")
        t, p, length = tokens.shape
        features = self.clip_model.encode_text(tokens.reshape(t * p, length).to(self.device))
        return F.normalize(features, dim=-1).reshape(t, p, -1)

    def lora_target_modules(self) -> list[str]:
        """SemLA's LoRA targets on SAN: CLIP q/k/v/c_fc/c_proj of both towers, the side ViT's
        qkv/proj/fc1/fc2 and the mask decoder's Linear layers (its query MLP), in module order."""
        names = []
        for name, module in self.named_modules():
            if not isinstance(getattr(module, "base_layer", module), nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if name.startswith(("clip_visual_extractor.", "clip_rec_head.", "ov_classifier.")):
                if leaf in ("q_proj", "k_proj", "v_proj", "c_fc", "c_proj"):
                    names.append(name)
            elif name.startswith("side_adapter_network.vit_model."):
                if leaf in ("qkv", "proj", "fc1", "fc2"):
                    names.append(name)
            elif name.startswith("side_adapter_network.mask_decoder.query_mlp."):
                names.append(name)
        return names

    def mark_trainable(self) -> None:
        """The original's trainable set: the side adapter, the background embedding and CLIP's positional
        embedding (``CLIP_FROZEN_EXCLUDE: ["positional_embedding"]``); the rest of CLIP is frozen."""
        for name, param in self.named_parameters():
            if name.startswith("side_adapter_network."):
                param.requires_grad_(True)
            elif name.startswith("clip_visual_extractor."):
                param.requires_grad_("positional_embedding" in name)
            else:
                param.requires_grad_(name == "ov_classifier.bg_embed")

    # -- forward ----------------------------------------------------------------------------------
    def predict_masks(self, padded: Tensor, text: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Normalised padded images -> per decoded block (B, Q, T + 1) class logits and (B, Q, h, w) masks.

        Args:
            padded: (B, 3, H, W) CLIP-normalised, zero-padded images.
            text: (T, P, C) shared or (B, T, P, C) per-image text features.
        """
        clip_input = F.interpolate(padded, scale_factor=self.clip_scale, mode="bilinear")
        keep = self.side_adapter_network.clip_layers | {self.clip_rec_head.first_layer}
        features, grid = self.clip_visual_extractor(clip_input.to(self.clip_model.dtype), keep)
        masks, biases = self.side_adapter_network(padded, features, grid)
        weight = self.ov_classifier.classifier(text)  # (T + 1, C) or (B, T + 1, C)
        equation = "bqc,nc->bqn" if weight.dim() == 2 else "bqc,bnc->bqn"
        logits = [torch.einsum(equation, self.clip_rec_head(features, grid, bias), weight) for bias in biases]
        return logits, masks

    def forward(
        self, batched_inputs: Sequence[dict], text_features: Tensor | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: SAN's weighted losses; eval: ``[{"sem_seg": (T, height, width)}]``.

        Args:
            batched_inputs: list of dicts (module docstring).
            text_features: (T, P, C) or (B, T, P, C); computed from the class names when None.
        """
        text = self.text_features() if text_features is None else text_features
        if text.dim() == 4 and text.shape[0] != len(batched_inputs):
            raise ValueError(
                f"per-image text features are given for {text.shape[0]} images, but the batch has "
                f"{len(batched_inputs)}"
            )
        images = [
            (x["image"].to(self.device, dtype=self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
        padded, sizes = pad_batch(images, self.size_divisibility)
        logits, masks = self.predict_masks(padded, text)
        if self.training:
            targets = [self._targets(x, padded.shape[-2:]) for x in batched_inputs]
            return self.criterion(logits, masks, targets)
        masks = F.interpolate(masks[-1], size=padded.shape[-2:], mode="bilinear", align_corners=False)
        results = []
        for i, x in enumerate(batched_inputs):
            height = int(x.get("height", sizes[i][0]))
            width = int(x.get("width", sizes[i][1]))
            probs = logits[-1][i].softmax(-1)[:, :-1]  # (Q, T)
            if self.postprocess_before_inference:
                mask = sem_seg_postprocess(masks[i], sizes[i], height, width).sigmoid()
                results.append({"sem_seg": torch.einsum("qc,qhw->chw", probs, mask)})
            else:
                sem = torch.einsum("qc,qhw->chw", probs, masks[i].sigmoid())
                results.append({"sem_seg": sem_seg_postprocess(sem, sizes[i], height, width)})
        return results

    def _targets(self, item: dict, padded_size: Sequence[int]) -> dict[str, Tensor]:
        """A training input's per-class masks (classes sorted, the ignore label left out), zero-padded."""
        if "instances" in item:
            labels, masks = item["instances"].gt_classes, item["instances"].gt_masks
        else:
            sem_seg = item["sem_seg"].to(self.device)
            labels = torch.unique(sem_seg)
            labels = labels[labels != self.ignore_value].to(torch.int64)
            masks = sem_seg[None] == labels[:, None, None]
        padded = torch.zeros(len(labels), *padded_size, dtype=torch.float32, device=self.device)
        padded[:, : masks.shape[-2], : masks.shape[-1]] = masks.to(self.device, torch.float32)
        return {"labels": labels.to(self.device), "masks": padded}


# --------------------------------------------------------------------------------------------------
# Presets and the builder
# --------------------------------------------------------------------------------------------------


def _clip_configs() -> dict[str, CLIPConfig]:
    from ..build import MODEL_PRESETS

    return {
        "ViT-B/16": MODEL_PRESETS["vitb_384"].clip,
        "ViT-B-16": MODEL_PRESETS["vitb_384"].clip,
        "ViT-L-14-336": MODEL_PRESETS["vitl_336"].clip,
        "ViT-L/14@336px": MODEL_PRESETS["vitl_336"].clip,
        "tiny": MODEL_PRESETS["tiny"].clip,
        "tiny-64": MODEL_PRESETS["tiny_64"].clip,
    }


_SAN_TEMPLATES = Path(__file__).with_name("prompt_templates.json")


def san_templates(name: str) -> list[str]:
    """The prompt templates of ``MODEL.SAN.CLIP_TEMPLATE_SET``: SAN's ``vild`` set (14 templates, the released
    models'), or one of CAT-Seg's sets (``imagenet``, ``imagenet_select``, ``single``)."""
    from ..text import prompt_templates

    with open(_SAN_TEMPLATES, encoding="utf-8") as f:
        own = json.load(f)
    if name in own:
        return list(own[name])
    try:
        return prompt_templates(name)
    except ValueError:
        raise ValueError(
            f"MODEL.SAN.CLIP_TEMPLATE_SET must be one of {sorted(own)} or CAT-Seg's sets, got {name!r}"
        ) from None


def clip_config_for(name: str) -> CLIPConfig:
    """The CLIP architecture of ``MODEL.SAN.CLIP_MODEL_NAME``."""
    configs = _clip_configs()
    if name not in configs:
        raise ValueError(
            f"MODEL.SAN.CLIP_MODEL_NAME {name!r} is not supported; choose one of {sorted(configs)}"
        )
    return configs[name]


def san_kwargs_from_cfg(cfg: Any) -> dict[str, Any]:
    """Everything :func:`build_san` needs from a config."""
    san, side = cfg.MODEL.SAN, cfg.MODEL.SIDE_ADAPTER
    fusion = {}
    for item in side.FUSION_MAP:
        try:
            clip_idx, side_idx = (int(v) for v in str(item).split("->"))
        except ValueError:
            raise ValueError(
                f"MODEL.SIDE_ADAPTER.FUSION_MAP entries look like '3->1', got {item!r}"
            ) from None
        if side_idx in fusion:
            raise ValueError(
                f"MODEL.SIDE_ADAPTER.FUSION_MAP names side block {side_idx} twice: {list(side.FUSION_MAP)}"
            )
        fusion[side_idx] = clip_idx
    if (
        san.SOS_TOKEN_FORMAT != "cls_token"
        or san.REC_CROSS_ATTN
        or side.NAME != "RegionwiseSideAdapterNetwork"
    ):
        raise ValueError(
            "only the released SAN design is implemented: MODEL.SAN.SOS_TOKEN_FORMAT cls_token, "
            "MODEL.SAN.REC_CROSS_ATTN False, MODEL.SIDE_ADAPTER.NAME RegionwiseSideAdapterNetwork"
        )
    if side.FUSION_TYPE != "add":
        raise ValueError(f"MODEL.SIDE_ADAPTER.FUSION_TYPE must be 'add', got {side.FUSION_TYPE!r}")
    return {
        "clip": clip_config_for(san.CLIP_MODEL_NAME),
        "templates": san_templates(san.CLIP_TEMPLATE_SET),
        "vit_name": side.VIT_NAME,
        "image_size": int(side.IMAGE_SIZE),
        "drop_path_rate": float(side.DROP_PATH_RATE),
        "num_queries": int(side.NUM_QUERIES),
        "fusion_map": fusion,
        "deep_supervision": list(side.DEEP_SUPERVISION_IDXS),
        "attn_bias": {
            "total_heads": int(side.ATTN_BIAS.NUM_HEADS),
            "total_layers": int(side.ATTN_BIAS.NUM_LAYERS),
            "embed_channels": int(side.ATTN_BIAS.EMBED_CHANNELS),
            "mlp_channels": int(side.ATTN_BIAS.MLP_CHANNELS),
            "mlp_num_layers": int(side.ATTN_BIAS.MLP_NUM_LAYERS),
            "rescale_attn_bias": bool(side.ATTN_BIAS.RESCALE_ATTN_BIAS),
        },
        "criterion": {
            "num_classes": int(san.NUM_CLASSES),
            "eos_coef": float(san.NO_OBJECT_WEIGHT),
            "class_weight": float(san.CLASS_WEIGHT),
            "mask_weight": float(san.MASK_WEIGHT),
            "dice_weight": float(san.DICE_WEIGHT),
            "num_points": int(san.TRAIN_NUM_POINTS),
            "oversample_ratio": float(san.OVERSAMPLE_RATIO),
            "importance_sample_ratio": float(san.IMPORTANCE_SAMPLE_RATIO),
        },
        "num_extract_layers": int(san.FEATURE_LAST_LAYER_IDX),
        "clip_scale": float(san.CLIP_RESOLUTION) if san.ASYMETRIC_INPUT else 1.0,
        "size_divisibility": int(san.SIZE_DIVISIBILITY),
        "pixel_mean": tuple(cfg.MODEL.CLIP_PIXEL_MEAN),
        "pixel_std": tuple(cfg.MODEL.CLIP_PIXEL_STD),
        "rec_downsample": san.REC_DOWNSAMPLE_METHOD,
        "postprocess_before_inference": bool(san.SEM_SEG_POSTPROCESS_BEFORE_INFERENCE),
        "ignore_value": int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE),
    }


def build_san(
    *,
    clip: CLIPConfig,
    templates: Sequence[str],
    vit_name: str,
    image_size: int,
    num_queries: int,
    fusion_map: dict[int, int],
    deep_supervision: Sequence[int],
    attn_bias: dict[str, Any],
    criterion: dict[str, Any],
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> SAN:
    """Assemble a randomly initialised SAN from resolved arguments (see :func:`san_kwargs_from_cfg`)."""
    from .side_adapter import MLPMaskDecoder, SideViT, SideViTConfig

    clip_model = CLIP(clip)
    vit = SideViT(SideViTConfig.from_name(vit_name), image_size, drop_path_rate)
    num_clip_layers = kwargs["num_extract_layers"]
    bad = [c for c in fusion_map.values() if not 0 <= c <= num_clip_layers]
    if bad:
        raise ValueError(
            f"MODEL.SIDE_ADAPTER.FUSION_MAP reads CLIP outputs {bad}, beyond the extractor's "
            f"{num_clip_layers} blocks (MODEL.SAN.FEATURE_LAST_LAYER_IDX)"
        )
    depth = vit.config.depth
    beyond = [b for b in fusion_map if not 0 <= b <= depth]
    if beyond:
        raise ValueError(
            f"MODEL.SIDE_ADAPTER.FUSION_MAP adds CLIP features at side blocks {beyond}; the side ViT "
            f"({vit_name}) has blocks 0 (before the first) to {depth}"
        )
    heads = clip.vision_heads
    if attn_bias["total_heads"] not in (1, heads):
        raise ValueError(
            f"MODEL.SIDE_ADAPTER.ATTN_BIAS.NUM_HEADS must be 1 or CLIP's {heads} heads, got {attn_bias['total_heads']}"
        )
    side = RegionwiseSideAdapterNetwork(
        vit_model=vit,
        clip_width=clip.vision_width,
        num_queries=num_queries,
        fusion_map=fusion_map,
        deep_supervision=deep_supervision,
        mask_decoder=MLPMaskDecoder(in_channels=vit.num_features, **attn_bias),
    )
    model = SAN(
        clip=clip_model,
        side_adapter_network=side,
        criterion=SetCriterion(**criterion),
        num_queries=num_queries,
        templates=templates,
        **kwargs,
    )
    model.mark_trainable()
    return model


def build_san_model(cfg: Any, device: str | torch.device = "cpu", *, class_names: bool = True) -> SAN:
    """Build SAN from a config on ``device`` (random weights; load a checkpoint afterwards).

    The builder of ``MODEL.META_ARCHITECTURE: "SAN"``; call it through ``build_model`` (same arguments).
    """
    from ..build import set_config_vocabularies

    kwargs = san_kwargs_from_cfg(cfg)
    with torch.device(device):
        model = build_san(**kwargs)
    if class_names:
        set_config_vocabularies(model, cfg)
    logger.info(
        "built SAN (%s, side %s) with %.1fM parameters on %s",
        cfg.MODEL.SAN.CLIP_MODEL_NAME,
        cfg.MODEL.SIDE_ADAPTER.VIT_NAME,
        sum(p.numel() for p in model.parameters()) / 1e6,
        device,
    )
    return model
