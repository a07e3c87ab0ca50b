"""A CLIP of the demo world: a tiny open_clip model pre-trained on the world's images.

The model has exactly the hyper-parameters of CAT-Seg's ``tiny_64`` preset (a 3-block ViT of width 64 on
64-px inputs with 8-px patches, a 2-block text transformer of width 32, 32-d embeddings, QuickGELU), so
that it can initialise the demo CAT-Seg's CLIP towers (:func:`cat_seg.checkpoint.load_clip_weights`), as
OpenAI's ViT-L/14@336px initialises CAT-Seg (L), and serve as the retrieval embedder of
``generate_embeddings.py`` / ``experiments.py``, as the ViT-L/14 CLIP does in the real setup.

Training is open_clip's own: its ``CLIP`` class and its symmetric InfoNCE ``ClipLoss`` with a learnt
temperature, on (image, caption) pairs whose captions name the objects in view, the weather and the time
of day. A web-scale CLIP also knows which words name which image regions, which CAT-Seg's cost volume
(patch features against class-name features) relies on; 1,200 captions cannot teach that, so where label
maps are given a dense term adds it: each patch token's dense feature (as CAT-Seg computes it) is
classified against the class prompts. The result is saved in open_clip's ``local-dir`` format
(``open_clip_config.json`` + ``open_clip_model.safetensors``), which ``--embedding_model <folder>`` reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cat_seg.fileio import atomic_write_text
from cat_seg.modeling import MODEL_PRESETS
from cat_seg.modeling.text import tokenize

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "model_config", "preprocess", "pretrain", "save"]

PRESET = "tiny_64"  # the demo model's CLIP (configs/demo/model.yaml: CLIP_PRETRAINED "tiny-64")
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# OpenAI CLIP's normalisation (what CAT-Seg's CLIP_PIXEL_MEAN/STD are, divided by 255).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def model_config() -> dict:
    """open_clip ``model_cfg`` with the hyper-parameters of CAT-Seg's ``tiny`` CLIP."""
    c = MODEL_PRESETS[PRESET].clip
    return {
        "embed_dim": c.embed_dim,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": c.image_size,
            "layers": c.vision_layers,
            "width": c.vision_width,
            "head_width": c.vision_width // c.vision_heads,
            "patch_size": c.vision_patch_size,
        },
        "text_cfg": {
            "context_length": c.context_length,
            "vocab_size": c.vocab_size,
            "width": c.text_width,
            "heads": c.text_heads,
            "layers": c.text_layers,
        },
    }


def preprocess(images: np.ndarray) -> torch.Tensor:
    """What open_clip's eval transform does for this model, on a stack of square images.

    Args:
        images: (N, S, S, 3) uint8.
    Returns:
        (N, 3, R, R) float32, R the model's image size: bicubic resize (antialiased), then the OpenAI
        normalisation. For square inputs the shortest-edge resize and centre crop reduce to this.
    """
    size = MODEL_PRESETS[PRESET].clip.image_size
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def patch_targets(labels: np.ndarray, patch: int, num_classes: int, ignore: int = 255) -> torch.Tensor:
    """Per-patch class shares of label maps: the soft targets of the dense term of :func:`pretrain`.

    Args:
        labels: (N, S, S) uint8 train ids, ``ignore`` where unlabelled.
        patch: the ViT's patch side (S divisible by it).
    Returns:
        (N, S/patch * S/patch, num_classes) float32: the share of each class among a patch's labelled
        pixels, row-major; all zero for a patch without labelled pixels.
    """
    y = torch.from_numpy(np.ascontiguousarray(labels)).long()
    valid = y != ignore
    onehot = F.one_hot(torch.where(valid, y, 0), num_classes).float() * valid.unsqueeze(-1)
    n, height, width, _ = onehot.shape
    pooled = onehot.reshape(n, height // patch, patch, width // patch, patch, num_classes).sum(dim=(2, 4))
    pooled = pooled.reshape(n, -1, num_classes)
    return pooled / pooled.sum(dim=-1, keepdim=True).clamp_min(1.0)


def dense_image_tokens(model, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - open_clip.CLIP
    """CAT-Seg's dense image features of an open_clip ViT: (N, h*w, embed_dim), unnormalised.

    The last block runs as :meth:`cat_seg.modeling.clip.ResidualAttentionBlock.forward_dense` does (each
    token's value path plus the CLS token as residual, then the MLP), the blocks before it as usual; so
    these are the features CAT-Seg builds its cost volume from once the weights initialise it.
    """
    visual = model.visual
    x = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    width = x.shape[-1]
    attn = last.attn
    v = F.linear(last.ln_1(x), attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
    v = attn.out_proj(v) + x[:, :1]
    x = v + last.mlp(last.ln_2(v))
    return visual.ln_post(x[:, 1:]) @ visual.proj


def pretrain(
    images: np.ndarray,
    captions: Sequence[str],
    *,
    labels: np.ndarray | None = None,
    class_prompts: Sequence[str] = (),
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    log_every: float = 30.0,
):  # noqa: ANN201 - open_clip.CLIP
    """Train a tiny open_clip CLIP on (image, caption) pairs with open_clip's contrastive loss.

    Args:
        images: (N, S, S, 3) uint8 training images.
        captions: N captions.
        epochs: passes over the pairs.
        batch_size: pairs per step (the negatives of each pair are the rest of its batch).
        lr: AdamW learning rate (cosine decay, 5 % linear warm-up).
        weight_decay: AdamW weight decay (not on gains, biases, embeddings and the temperature).
        labels: optional (N, S, S) uint8 train ids (255 = unlabelled) for the dense term: each patch token's
            dense feature (:func:`dense_image_tokens`) is classified against the text features of
            ``class_prompts`` (cross-entropy on the patch's class shares, :func:`patch_targets`). An
            image whose label map is all 255 adds nothing to it.
        class_prompts: one prompt per train id, e.g. CAT-Seg's "A photo of a road in the scene".
        seed: seeds the initialisation and the batch order.
        log_every: seconds between progress log lines.
    Returns:
        the trained ``open_clip.CLIP`` (eval mode) and the per-epoch mean losses.
    """
    import open_clip
    from open_clip.loss import ClipLoss

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    torch.manual_seed(seed)
    cfg = model_config()
    model = open_clip.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=open_clip.CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=open_clip.CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=True,
    )
    pixels = preprocess(images)
    tokens = tokenize(list(captions), cfg["text_cfg"]["context_length"])
    targets = None
    if labels is not None:
        if len(labels) != len(images) or not class_prompts:
            raise ValueError("the dense term needs one label map per image and one prompt per class")
        patch = cfg["vision_cfg"]["patch_size"]
        targets = patch_targets(labels, patch, len(class_prompts))
        grid = cfg["vision_cfg"]["image_size"] // patch
        prompt_tokens = tokenize(list(class_prompts), cfg["text_cfg"]["context_length"])
        prompt_length = int(prompt_tokens.argmax(dim=-1).max()) + 1
    # The text tower reads the end-of-text token's feature; under the causal mask nothing after the longest
    # caption's end can change it, so training uses the context up to there (4x cheaper than 77 tokens).
    length = int(tokens.argmax(dim=-1).max()) + 1
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    loss_fn = ClipLoss()
    steps_per_epoch = math.ceil(len(pixels) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)
    generator = torch.Generator().manual_seed(seed)
    losses, step, last_log, start = [], 0, time.monotonic(), time.monotonic()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(pixels), generator=generator)
        epoch_loss = 0.0
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            for group in optimizer.param_groups:  # warm-up, then cosine decay to 0
                group["lr"] = lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / total)))
            x = pixels[index]
            flip = torch.rand(len(index), generator=generator) < 0.5  # left-right flips keep the caption true
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            image_features = F.normalize(model.encode_image(x), dim=-1)
            text_features = F.normalize(_encode_text(model, tokens[index, :length]), dim=-1)
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
            if targets is not None:
                loss = loss + _dense_loss(
                    model, x, targets[index], flip, grid, prompt_tokens[:, :prompt_length]
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training does
            epoch_loss += float(loss.detach()) * len(index)
            step += 1
            if time.monotonic() - last_log >= log_every:
                last_log = time.monotonic()
                logger.info("CLIP pre-training: step %d/%d, loss %.3f", step, total, float(loss.detach()))
        losses.append(epoch_loss / len(pixels))
    logger.info(
        "CLIP pre-training: %d epochs in %.0f s, loss %.3f -> %.3f",
        epochs,
        time.monotonic() - start,
        losses[0],
        losses[-1],
    )
    return model.eval(), losses


def _dense_loss(
    model,  # noqa: ANN001 - open_clip.CLIP
    x: torch.Tensor,
    targets: torch.Tensor,
    flip: torch.Tensor,
    grid: int,
    prompt_tokens: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of the patch tokens against the class prompts, over the labelled patches of a batch."""
    t = targets.reshape(len(targets), grid, grid, -1)
    t = torch.where(flip[:, None, None, None], t.flip(2), t).reshape(len(targets), grid * grid, -1)
    labelled = t.sum(dim=-1) > 0
    if not bool(labelled.any()):
        return x.new_zeros(())
    keep = labelled.any(dim=1)  # images with labels: only they pay for the dense forward
    tokens = F.normalize(dense_image_tokens(model, x[keep]), dim=-1)[labelled[keep]]
    classes = F.normalize(_encode_text(model, prompt_tokens), dim=-1)
    logits = model.logit_scale.exp() * tokens @ classes.T
    return -(t[keep][labelled[keep]] * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def _encode_text(model, tokens: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - open_clip.CLIP
    """open_clip's ``CLIP.encode_text`` (argmax pooling) on a context cut after the last end-of-text token.

    Args:
        tokens: (N, L) ids, L <= the context length, every sequence's end-of-text token inside.
    Returns:
        (N, embed_dim), equal to ``model.encode_text`` on the full, zero-padded context.
    """
    length = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return x @ model.text_projection


def save(model, folder: str | os.PathLike) -> Path:  # noqa: ANN001 - open_clip.CLIP
    """Write the model in open_clip's ``local-dir`` format; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "attn_mask"}
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_FILE)
    config = {
        "model_cfg": model_config(),
        "preprocess_cfg": {
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return folder
