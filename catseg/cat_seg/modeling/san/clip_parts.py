"""SAN's three views of one CLIP model: the feature extractor (first blocks), the recognition head (the
remaining blocks, run on query tokens with SAN's attention bias) and the open-vocabulary classifier (the
text tower plus a learnt background embedding).

The three modules hold the very parameters of one :class:`~cat_seg.modeling.clip.CLIP` (no copies), under
the names of the original SAN state dict (``clip_visual_extractor.resblocks.N...``,
``clip_rec_head.resblocks.N...``, ``ov_classifier.transformer.resblocks.N...``). The attention of every
block keeps CAT-Seg's split q/k/v ``nn.Linear`` modules (LoRA targets that the forward really calls); its
state dict is written in the packed ``attn.in_proj_weight`` spelling of open_clip / SAN
(:func:`pack_attention_state_dicts`), and either spelling loads.

Tensors are batch-first: tokens are (B, L, D), CLS first.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..clip import _QKV, CLIP, Attention, resize_positional_embedding


def _pack_qkv_hook(module: Attention, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post hook of an :class:`Attention`: the q/k/v weights as one packed ``in_proj_weight``.

    Removes the aliases ``{q,k,v}_proj_weight`` and the Linear keys ``{q,k,v}_proj.weight`` (or
    ``.base_layer.weight`` under PEFT; LoRA factors are kept) and writes ``in_proj_weight`` first, in
    the order of open_clip's ``nn.MultiheadAttention`` (in_proj_weight, in_proj_bias, out_proj.*).
    """
    own = [k for k in state_dict if k.startswith(prefix)]
    items = {k: state_dict.pop(k) for k in own}
    drop = {f"{prefix}{w}_proj_weight" for w in _QKV}
    drop |= {f"{prefix}{w}_proj.weight" for w in _QKV} | {f"{prefix}{w}_proj.base_layer.weight" for w in _QKV}
    weights = [module._projection(w).weight for w in _QKV]
    state_dict[f"{prefix}in_proj_weight"] = torch.cat(weights, dim=0).detach()
    for key, value in items.items():
        if key not in drop:
            state_dict[key] = value


def pack_attention_state_dicts(module: nn.Module) -> None:
    """Make every CLIP :class:`Attention` inside ``module`` save its q/k/v weights packed (SAN's names)."""
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.register_state_dict_post_hook(_pack_qkv_hook)


class FeatureExtractor(nn.Module):
    """The first ``num_layers`` CLIP image blocks, run once on the (down-scaled) image.

    Args:
        clip: the CLIP whose image tower is split (its modules are shared, not copied).
        num_layers: blocks run here (``MODEL.SAN.FEATURE_LAST_LAYER_IDX``: 9 for ViT-B/16, 18 for ViT-L/14).
    """

    def __init__(self, clip: CLIP, num_layers: int) -> None:
        super().__init__()
        visual = clip.visual
        if not 0 < num_layers < len(visual.transformer.resblocks):
            raise ValueError(
                f"MODEL.SAN.FEATURE_LAST_LAYER_IDX must be in [1, {len(visual.transformer.resblocks) - 1}], "
                f"got {num_layers}"
            )
        self.patch_size = visual.patch_size
        self.image_size = visual.image_size
        self.num_features = visual.transformer.width
        # Registration order = the original state dict's order.
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        self.resblocks = nn.ModuleList(visual.transformer.resblocks[:num_layers])

    def resized_positional_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """(1 + grid_h * grid_w, D): the CLS position, then the grid bicubically resized (align_corners=False)."""
        return resize_positional_embedding(
            self.positional_embedding, self.image_size // self.patch_size, grid_h, grid_w
        )

    def forward(
        self, images: Tensor, keep: set[int] | None = None
    ) -> tuple[dict[int, Tensor], tuple[int, int]]:
        """Run the blocks.

        Args:
            images: (B, 3, H, W) CLIP-normalised.
            keep: the outputs to return (0 = after ``ln_pre``, i = after block i); None: all.
        Returns:
            {i: (B, 1 + h*w, D) tokens, CLS first} and the token grid (h, w).
        """
        x = self.conv1(images)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = rearrange(x, "b d h w -> b (h w) d")
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.resized_positional_embedding(*grid).to(x.dtype)
        x = self.ln_pre(x)
        outputs = {0: x} if keep is None or 0 in keep else {}
        for i, block in enumerate(self.resblocks, start=1):
            x = block(x)
            if keep is None or i in keep:
                outputs[i] = x
        return outputs, grid


def recognition_attention_mask(bias: Tensor, num_queries: int, num_image_tokens: int) -> Tensor:
    """SAN's float attention mask over ``[queries, CLS, patches]`` (the original's self-attention variant).

    Every token attends to the CLS token and the patches freely (0); no token attends to a query (-100)
    except each query to itself (0); a query does not attend to CLS (-100) and attends to the patches with
    the side adapter's bias.

    Args:
        bias: (B, heads, Q, P) query->patch attention bias, P = h*w patches.
        num_queries: Q.
        num_image_tokens: 1 + P.
    Returns:
        (B, heads, Q + 1 + P, Q + 1 + P).
    """
    batch, heads, q, patches = bias.shape
    total = num_queries + num_image_tokens
    base = bias.new_zeros(total, total)
    base[:, :num_queries] = -100.0
    diag = torch.arange(num_queries, device=bias.device)
    base[diag, diag] = 0.0
    base[:num_queries, num_queries] = -100.0
    mask = base.expand(batch, heads, total, total).clone()
    mask[:, :, :num_queries, total - patches :] = bias
    return mask


class RecWithAttnbiasHead(nn.Module):
    """The remaining CLIP image blocks, ``ln_post`` and ``proj``: mask embeddings from query tokens.

    The queries start as copies of the CLS token (``MODEL.SAN.SOS_TOKEN_FORMAT: cls_token``) and run with
    the image tokens through the blocks under :func:`recognition_attention_mask` (``REC_CROSS_ATTN``
    False, the released models' setting); the side adapter's bias is max-pooled to the CLIP grid.

    Args:
        clip: the CLIP whose image tower is split.
        first_layer: the first block run here (= the extractor's block count).
        num_queries: Q.
        downsample: how the bias is resized to the CLIP grid (``max``, ``avg`` or an interpolation mode).
    """

    def __init__(self, clip: CLIP, first_layer: int, num_queries: int, downsample: str = "max") -> None:
        super().__init__()
        visual = clip.visual
        self.first_layer = int(first_layer)
        self.num_queries = int(num_queries)
        self.downsample = downsample
        self.num_heads = visual.transformer.resblocks[0].attn.num_heads
        self.resblocks = nn.ModuleList(visual.transformer.resblocks[first_layer:])
        self.ln_post = visual.ln_post
        self.proj = visual.proj

    def _resize_bias(self, bias: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, heads or 1, Q, h', w') -> (B, heads, Q, h*w) on the CLIP grid."""
        batch, heads, q, h, w = bias.shape
        flat = bias.reshape(batch, heads * q, h, w)
        if self.downsample == "max":
            flat = F.adaptive_max_pool2d(flat, grid)
        elif self.downsample == "avg":
            flat = F.adaptive_avg_pool2d(flat, grid)
        else:
            flat = F.interpolate(flat, size=grid, mode=self.downsample, align_corners=False)
        if heads not in (1, self.num_heads):
            raise ValueError(f"the attention bias has {heads} heads; CLIP has {self.num_heads}")
        flat = flat.reshape(batch, heads, q, grid[0] * grid[1])
        return flat.expand(-1, self.num_heads, -1, -1) if heads == 1 else flat

    def forward(
        self, features: Mapping[int, Tensor], grid: tuple[int, int], attn_biases: list[Tensor]
    ) -> Tensor:
        """Mask embeddings.

        Args:
            features: the extractor's outputs (uses block ``first_layer``'s tokens).
            grid: the CLIP token grid (h, w).
            attn_biases: one (B, heads or 1, Q, h', w') bias for every block, or one shared by all.
        Returns:
            (B, Q, C) L2-normalised mask embeddings.
        """
        x = features[self.first_layer]  # (B, 1 + P, D)
        if len(attn_biases) not in (1, len(self.resblocks)):
            raise ValueError(f"{len(attn_biases)} attention biases for {len(self.resblocks)} blocks")
        masks = [
            recognition_attention_mask(self._resize_bias(b, grid), self.num_queries, x.shape[1])
            for b in attn_biases
        ]
        queries = x[:, :1].expand(-1, self.num_queries, -1)
        x = torch.cat([queries, x], dim=1)
        for i, block in enumerate(self.resblocks):
            x = block(x, attn_mask=masks[i if len(masks) > 1 else 0].to(x.dtype))
        tokens = self.ln_post(x[:, : self.num_queries]) @ self.proj
        return F.normalize(tokens, dim=-1)


def causal_text_mask(context_length: int) -> Tensor:
    """open_clip's text ``attn_mask`` buffer: -inf above the diagonal, 0 elsewhere."""
    return torch.full((context_length, context_length), float("-inf")).triu_(1)


class LearnableBgOvClassifier(nn.Module):
    """CLIP's text tower with the prompt-ensembled class embeddings and a learnt background embedding.

    Holds the text-tower parameters of ``clip`` under the original names (``transformer``,
    ``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``,
    the ``attn_mask`` buffer that open_clip's checkpoints carry) and ``bg_embed``.
    """

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.positional_embedding = clip.positional_embedding
        self.text_projection = clip.text_projection
        self.logit_scale = clip.logit_scale
        self.transformer = clip.transformer
        self.token_embedding = clip.token_embedding
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", causal_text_mask(clip.context_length))
        dim = clip.text_projection.shape[1]
        self.bg_embed = nn.Parameter(torch.empty(1, dim))
        if not self.bg_embed.is_meta:
            nn.init.normal_(self.bg_embed, std=dim**-0.5)

    def classifier(self, text_features: Tensor) -> Tensor:
        """Class weights from per-prompt text features: template mean, normalise, append background,
        normalise, times ``exp(logit_scale)``.

        Args:
            text_features: (T, P, C) or (B, T, P, C) normalised per-prompt features.
        Returns:
            (T + 1, C) or (B, T + 1, C).
        """
        classes = F.normalize(text_features.mean(dim=-2), dim=-1)
        bg = self.bg_embed.to(classes.dtype)
        if classes.dim() == 3:
            bg = bg.expand(classes.shape[0], 1, -1)
        weight = F.normalize(torch.cat([classes, bg], dim=-2), dim=-1)
        return self.logit_scale.exp() * weight
