"""The CAT-Seg meta-architecture: CLIP + cost aggregation, whole-image and sliding-window inference.

Module names follow the released checkpoints: ``sem_seg_head.predictor.clip_model`` (CLIP),
``sem_seg_head.predictor.transformer`` (the aggregator), ``upsample1`` / ``upsample2`` (guidance).

Inputs follow detectron2's convention: a list of dicts, each with ``"image"`` a (3, H, W) RGB tensor in
0-255 (uint8 or float), optional ``"height"`` / ``"width"`` (the size to predict at, usually the
original image size) and, for training, ``"sem_seg"`` (H, W) int64 train ids.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .aggregator import Aggregator
from .clip import CLIP, clip_trainable_mask
from .text import tokenize_class_names

logger = logging.getLogger(__name__)


def sem_seg_postprocess(result: Tensor, image_size: Sequence[int], height: int, width: int) -> Tensor:
    """Crop a prediction to the valid image area and resize it (detectron2's ``sem_seg_postprocess``).

    Args:
        result: (T, H', W') scores.
        image_size: (h, w) of the un-padded input; the crop ``[:h, :w]`` is a no-op when the map is smaller.
        height, width: output size.
    Returns:
        (T, height, width), bilinear.
    """
    result = result[:, : image_size[0], : image_size[1]].unsqueeze(0)
    return F.interpolate(result, size=(height, width), mode="bilinear", align_corners=False)[0]


def pad_batch(images: Sequence[Tensor], size_divisibility: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """Zero-pad (C, H, W) images at the bottom and right to one (B, C, H', W') batch, H' and W' the largest
    sides rounded up to ``size_divisibility`` (detectron2's ``ImageList.from_tensors``).

    Returns:
        the batch and each image's (H, W).
    """
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    height = max(s[0] for s in sizes)
    width = max(s[1] for s in sizes)
    if size_divisibility > 1:
        d = size_divisibility
        height, width = (height + d - 1) // d * d, (width + d - 1) // d * d
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]] = im
    return batch, sizes


class CATSegPredictor(nn.Module):
    """Holds CLIP and the aggregator; turns class prompts into text features and features into logits.

    Args:
        clip_model: the CLIP towers.
        transformer: the cost-aggregation network.
        templates: prompt templates (``{}`` = class name).
    """

    def __init__(self, *, clip_model: CLIP, transformer: Aggregator, templates: Sequence[str]) -> None:
        super().__init__()
        self.clip_model = clip_model
        self.transformer = transformer
        self.templates = list(templates)

    def text_features(self, tokens: Tensor) -> Tensor:
        """Encode class prompts.

        Args:
            tokens: (T, P, L) prompt tokens.
        Returns:
            (T, P, C) L2-normalised text features.
        """
        classes, prompts, length = tokens.shape
        feats = self.clip_model.encode_text(tokens.reshape(classes * prompts, length))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return feats.reshape(classes, prompts, -1)

    def forward(self, image_features: Tensor, guidance: Sequence[Tensor], text: Tensor) -> Tensor:
        """(B, C, H, W) features, [res3, res4, res5] guidance, (B, T, P, C) text -> (B, T, 4H, 4W) logits."""
        return self.transformer(image_features, text, guidance)


class CATSegHead(nn.Module):
    """The semantic-segmentation head (a thin holder of the predictor, as in the checkpoints)."""

    def __init__(self, *, predictor: CATSegPredictor, ignore_value: int = 255) -> None:
        super().__init__()
        self.predictor = predictor
        self.ignore_value = ignore_value

    def forward(self, clip_tokens: Tensor, guidance: Sequence[Tensor], text: Tensor) -> Tensor:
        """(B, 1 + H*W, C) dense CLIP tokens (CLS first) -> (B, T, 4H, 4W) logits."""
        grid = clip_tokens.shape[1] - 1
        side = int(round(grid**0.5))
        if side * side != grid:
            raise ValueError(f"expected a square token grid, got {grid} tokens")
        image = rearrange(clip_tokens[:, 1:], "b (h w) c -> b c h w", h=side)
        return self.predictor(image, guidance, text)


class CATSeg(nn.Module):
    """CAT-Seg.

    Args:
        sem_seg_head: the head holding CLIP and the aggregator.
        upsample1: (width -> C4, 2x) transposed conv for the first guidance layer.
        upsample2: (width -> C5, 4x) transposed conv for the second guidance layer.
        guidance_layers: the two CLIP visual blocks whose outputs feed ``upsample1`` and ``upsample2``.
        train_guidance_layers: the blocks used instead in training mode; None: ``guidance_layers``. The
            original SemLA LoRA trainer effectively used ``(guidance_layers[0],) * 2`` (its guidance hooks
            were registered twice; docs/differences.md#q2), which ``MODEL.LORA.REFERENCE_TRAINING``
            restores.
        clip_resolution: side of the square CLIP input.
        pixel_mean, pixel_std: ImageNet normalisation (kept for config parity; CAT-Seg does not use it).
        clip_pixel_mean, clip_pixel_std: CLIP normalisation in 0-255 units.
        size_divisibility: padding multiple of the whole-image path.
        sliding_window: use sliding-window inference in eval mode.
        sliding_kernel: crop side of the sliding window (384 for the released models).
        sliding_overlap: crop overlap fraction (0.333).
        sliding_out_res: side the image is resized to before cropping (640).
        train_class_names, test_class_names: prompts' class names for training and evaluation.
        context_length: text context length of the tokenizer.
    """

    def __init__(
        self,
        *,
        sem_seg_head: CATSegHead,
        upsample1: nn.Module,
        upsample2: nn.Module,
        guidance_layers: Sequence[int],
        clip_resolution: int,
        train_guidance_layers: Sequence[int] | None = None,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        clip_pixel_mean: Sequence[float] = (122.7709383, 116.7460125, 104.09373615),
        clip_pixel_std: Sequence[float] = (68.5005327, 66.6321579, 70.3231630),
        size_divisibility: int = 32,
        sliding_window: bool = False,
        sliding_kernel: int = 384,
        sliding_overlap: float = 0.333,
        sliding_out_res: int = 640,
        train_class_names: Sequence[str] = (),
        test_class_names: Sequence[str] = (),
        context_length: int = 77,
    ) -> None:
        super().__init__()
        if len(guidance_layers) != 2:
            raise ValueError(f"guidance_layers must name two CLIP blocks, got {list(guidance_layers)}")
        self.sem_seg_head = sem_seg_head
        self.upsample1 = upsample1
        self.upsample2 = upsample2
        self.guidance_layers = tuple(int(i) for i in guidance_layers)
        self.train_guidance_layers = train_guidance_layers
        self.clip_resolution = int(clip_resolution)
        self.size_divisibility = int(size_divisibility)
        self.sliding_window = sliding_window
        self.sliding_kernel = int(sliding_kernel)
        self.sliding_overlap = float(sliding_overlap)
        self.sliding_out_res = int(sliding_out_res)
        self.context_length = context_length
        for name, value in (
            ("pixel_mean", pixel_mean),
            ("pixel_std", pixel_std),
            ("clip_pixel_mean", clip_pixel_mean),
            ("clip_pixel_std", clip_pixel_std),
        ):
            self.register_buffer(
                name, torch.tensor(value, dtype=torch.float32).view(-1, 1, 1), persistent=False
            )
        self.train_class_names: list[str] = []
        self.test_class_names: list[str] = []
        self.register_buffer(
            "train_tokens", torch.zeros(0, 1, context_length, dtype=torch.int64), persistent=False
        )
        self.register_buffer(
            "test_tokens", torch.zeros(0, 1, context_length, dtype=torch.int64), persistent=False
        )
        if train_class_names or test_class_names:
            self.set_class_names(
                train=train_class_names or test_class_names, test=test_class_names or train_class_names
            )

    # -- properties ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.clip_pixel_mean.device

    @property
    def clip_model(self) -> CLIP:
        return self.sem_seg_head.predictor.clip_model

    @property
    def ignore_value(self) -> int:
        return self.sem_seg_head.ignore_value

    @property
    def class_names(self) -> list[str]:
        """Class names of the current mode (train or test); index = output channel."""
        return self.train_class_names if self.training else self.test_class_names

    @property
    def class_tokens(self) -> Tensor:
        """(T, P, L) prompt tokens of the current mode's vocabulary."""
        return self.train_tokens if self.training else self.test_tokens

    # -- classes and text ------------------------------------------------------------------------
    def set_class_names(
        self, *, train: Sequence[str] | None = None, test: Sequence[str] | None = None
    ) -> None:
        """Set the class vocabularies and tokenise their prompts (no text encoding happens here)."""
        templates = self.sem_seg_head.predictor.templates
        if train is not None:
            self.train_class_names = list(train)
            self.train_tokens = tokenize_class_names(train, templates, self.context_length).to(self.device)
        if test is not None:
            self.test_class_names = list(test)
            self.test_tokens = tokenize_class_names(test, templates, self.context_length).to(self.device)

    def text_features(self, tokens: Tensor | None = None) -> Tensor:
        """Text features of the current vocabulary (computed, never cached here).

        Args:
            tokens: (T, P, L) prompt tokens; default: the current mode's class prompts.
        Returns:
            (T, P, C) normalised text features.
        """
        if tokens is None:
            tokens = self.class_tokens
        if tokens.shape[0] == 0:
            raise RuntimeError("no class names set: call set_class_names() or build the model from a config")
        return self.sem_seg_head.predictor.text_features(tokens)

    @property
    def train_guidance_layers(self) -> tuple[int, int] | None:
        """The guidance blocks of training mode, or None when they are ``guidance_layers``."""
        return self._train_guidance_layers

    @train_guidance_layers.setter
    def train_guidance_layers(self, layers: Sequence[int] | None) -> None:
        if layers is not None and len(layers) != 2:
            raise ValueError(f"train_guidance_layers must name two CLIP blocks, got {list(layers)}")
        self._train_guidance_layers = None if layers is None else (int(layers[0]), int(layers[1]))

    # -- features --------------------------------------------------------------------------------
    def _normalize_for_clip(self, images: Tensor) -> Tensor:
        return (images - self.clip_pixel_mean) / self.clip_pixel_std

    def _predict_logits(self, clip_images: Tensor, text: Tensor) -> Tensor:
        """CLIP-normalised images at CLIP resolution -> (B, T, 4h, 4w) logits.

        Args:
            clip_images: (B, 3, R, R).
            text: (T, P, C) shared or (B, T, P, C) per-image text features.
        """
        visual = self.clip_model.visual
        layers = self.guidance_layers
        if self.training and self.train_guidance_layers is not None:
            layers = self.train_guidance_layers
        tokens, (g1, g2) = visual.forward_intermediates(
            clip_images.to(self.clip_model.dtype), dense=True, indices=layers
        )
        side = clip_images.shape[-1] // visual.patch_size
        res3 = rearrange(tokens[:, 1:], "b (h w) c -> b c h w", h=side)
        res4 = self.upsample1(rearrange(g1[:, 1:], "b (h w) c -> b c h w", h=side))
        res5 = self.upsample2(rearrange(g2[:, 1:], "b (h w) c -> b c h w", h=side))
        batch = clip_images.shape[0]
        if text.dim() == 3:
            text = text.expand(batch, *text.shape)  # shared by every image: a view, not a copy
        elif text.shape[0] != batch:
            raise ValueError(f"per-image text features have batch {text.shape[0]}, images have {batch}")
        return self.sem_seg_head(tokens, [res3, res4, res5], text)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self, batched_inputs: Sequence[dict], text_features: Tensor | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: ``{"loss_sem_seg": loss}``; eval: ``[{"sem_seg": (T, height, width)}]`` probabilities.

        Args:
            batched_inputs: list of dicts (see the module docstring).
            text_features: (T, P, C) or (B, T, P, C) class text features; computed from the class names
                when None (callers that evaluate many images should compute them once and pass them).
        """
        text = self.text_features() if text_features is None else text_features
        if text.dim() == 4 and text.shape[0] != len(batched_inputs):
            raise ValueError(
                f"per-image text features are given for {text.shape[0]} images, but the batch has "
                f"{len(batched_inputs)}; pass (T, P, C) features shared by the batch, or one row per image "
                "(e.g. fused_text_features with one weight row per image)"
            )
        if not self.training and self.sliding_window:
            return self.inference_sliding_window(batched_inputs, text)
        images = [x["image"].to(self.device, dtype=torch.float32) for x in batched_inputs]
        padded, sizes = self._pad_batch([self._normalize_for_clip(im) for im in images])
        clip_images = F.interpolate(
            padded, size=(self.clip_resolution, self.clip_resolution), mode="bilinear", align_corners=False
        )
        logits = self._predict_logits(clip_images, text)  # (B, T, 4h, 4w)
        if self.training:
            targets = torch.stack([x["sem_seg"].to(self.device) for x in batched_inputs])
            return {"loss_sem_seg": self.losses(logits, targets)}
        probs = logits.sigmoid()
        results = []
        for i, x in enumerate(batched_inputs):
            height = int(x.get("height", sizes[i][0]))
            width = int(x.get("width", sizes[i][1]))
            results.append({"sem_seg": sem_seg_postprocess(probs[i], sizes[i], height, width)})
        return results

    def _pad_batch(self, images: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Zero-pad (3, H, W) images to a common size divisible by ``size_divisibility``."""
        return pad_batch(images, self.size_divisibility)

    def losses(self, logits: Tensor, targets: Tensor) -> Tensor:
        """CAT-Seg's loss: per-class binary cross-entropy on one-hot targets.

        Ignore pixels get an all-zero target but are *not* masked out (as in CAT-Seg).

        Args:
            logits: (B, T, h, w).
            targets: (B, H, W) train ids, ``ignore_value`` for ignored pixels.
        Returns:
            scalar mean over B x H x W x T.
        """
        logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        num_classes = logits.shape[1]
        valid = targets != self.ignore_value
        bad = targets[valid]
        if bad.numel() and (bad.min() < 0 or bad.max() >= num_classes):
            raise ValueError(
                f"training labels must be in [0, {num_classes}) or {self.ignore_value}, "
                f"got values in [{int(bad.min())}, {int(bad.max())}]"
            )
        onehot = F.one_hot(torch.where(valid, targets, 0), num_classes).to(logits.dtype)
        onehot = onehot * valid.unsqueeze(-1)
        return F.binary_cross_entropy_with_logits(rearrange(logits, "b t h w -> b h w t"), onehot)

    @torch.no_grad()
    def inference_sliding_window(
        self, batched_inputs: Sequence[dict], text: Tensor
    ) -> list[dict[str, Tensor]]:
        """CAT-Seg's sliding-window inference, for every image of the batch at once.

        Each image is resized to ``out_res`` x ``out_res``, cut into overlapping ``kernel`` crops (2 x 2
        for the released settings) and joined by a global view resized to ``kernel``; all views go
        through the network in one batch. Crop probabilities are folded back and averaged where they
        overlap, then averaged with the global view's, and resized to the requested output size.

        Args:
            batched_inputs: list of input dicts.
            text: (T, P, C) shared or (B, T, P, C) per-image text features.
        Returns:
            one ``{"sem_seg": (T, height, width)}`` per image.
        """
        kernel, out_res = self.sliding_kernel, self.sliding_out_res
        stride = int(kernel * (1 - self.sliding_overlap))
        unfold = nn.Unfold(kernel_size=kernel, stride=stride)
        fold = nn.Fold((out_res, out_res), kernel_size=kernel, stride=stride)
        views = []
        for x in batched_inputs:
            image = x["image"].to(self.device, dtype=torch.float32).unsqueeze(0)
            resized = F.interpolate(image, size=(out_res, out_res), mode="bilinear", align_corners=False)
            crops = rearrange(unfold(resized), "1 (c h w) l -> l c h w", c=3, h=kernel)
            whole = F.interpolate(image, size=(kernel, kernel), mode="bilinear", align_corners=False)
            views.append(torch.cat([crops, whole], dim=0))
        num_views = views[0].shape[0]  # crops + 1
        clip_images = F.interpolate(
            self._normalize_for_clip(torch.cat(views)),
            size=(self.clip_resolution, self.clip_resolution),
            mode="bilinear",
            align_corners=False,
        )
        if text.dim() == 4:
            text = repeat(text, "b t p c -> (b v) t p c", v=num_views)
        logits = rearrange(self._predict_logits(clip_images, text), "(b v) t h w -> b v t h w", v=num_views)
        coverage = fold(unfold(torch.ones(1, 1, out_res, out_res, device=self.device)))  # (1, 1, R, R)
        results = []
        for i, x in enumerate(batched_inputs):
            # One image at a time: its (views, T, kernel, kernel) probabilities, not the whole batch's.
            probs = F.interpolate(logits[i], size=(kernel, kernel), mode="bilinear", align_corners=False)
            probs = probs.sigmoid()
            local = fold(rearrange(probs[:-1], "l t h w -> 1 (t h w) l")) / coverage  # (1, T, R, R)
            glob = F.interpolate(probs[-1:], size=(out_res, out_res), mode="bilinear", align_corners=False)
            merged = ((local + glob) / 2.0)[0]
            height = int(x.get("height", out_res))
            width = int(x.get("width", out_res))
            results.append({"sem_seg": sem_seg_postprocess(merged, (out_res, out_res), height, width)})
        return results

    # -- trainability -------------------------------------------------------------------------------
    def mark_trainable(self, clip_finetune: str) -> list[str]:
        """Set ``requires_grad`` for CAT-Seg fine-tuning and return the trainable parameter names.

        CLIP parameters follow :func:`clip_trainable_mask`; everything outside CLIP (aggregator,
        guidance upsamplers) trains.
        """
        prefix = "sem_seg_head.predictor.clip_model."
        names = []
        for name, param in self.named_parameters():
            trainable = (
                clip_trainable_mask(name[len(prefix) :], clip_finetune) if name.startswith(prefix) else True
            )
            param.requires_grad_(trainable)
            if trainable:
                names.append(name)
        return names
