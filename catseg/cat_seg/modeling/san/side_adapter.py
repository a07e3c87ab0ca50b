"""SAN's side adapter network: a small ViT on the full-resolution image with learnt query tokens, CLIP
features fused in at a few blocks, and an MLP mask decoder that predicts mask logits and one attention
bias per CLIP head.

Module and parameter names follow the original (``vit_model.blocks.N.attn.qkv``, ``fusion_layers.layer_3``,
``mask_decoder.query_mlp.layers.0``, ...), so the released weights load unchanged. The ViT blocks are timm's
``Block`` (the original builds timm's ``VisionTransformer``; only its patch embedding, position embedding
and blocks are used, without class token and final norm).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

_VIT_NAME = re.compile(r"^vit_w(\d+)n(\d+)d(\d+)_patch(\d+)$")


@dataclass(frozen=True)
class SideViTConfig:
    """The side ViT named by ``MODEL.SIDE_ADAPTER.VIT_NAME``, e.g. ``vit_w240n6d8_patch16``."""

    width: int
    heads: int
    depth: int
    patch_size: int

    @classmethod
    def from_name(cls, name: str) -> SideViTConfig:
        """Parse ``vit_w<width>n<heads>d<depth>_patch<patch>`` (the original registers w144/192/240/288)."""
        match = _VIT_NAME.match(name)
        if match is None:
            raise ValueError(
                f"MODEL.SIDE_ADAPTER.VIT_NAME must look like vit_w240n6d8_patch16 "
                f"(width, heads, depth, patch), got {name!r}"
            )
        width, heads, depth, patch = (int(g) for g in match.groups())
        if width % heads:
            raise ValueError(
                f"MODEL.SIDE_ADAPTER.VIT_NAME {name!r}: width {width} is not divisible by {heads} heads"
            )
        return cls(width=width, heads=heads, depth=depth, patch_size=patch)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens; keeps the (h, w) grid."""

    def __init__(self, image_size: int, patch_size: int, width: int) -> None:
        super().__init__()
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        return rearrange(x, "b c h w -> b (h w) c"), grid


class SideViT(nn.Module):
    """The side ViT (``vit_model``): patch embedding, a position embedding without class token, blocks."""

    def __init__(self, config: SideViTConfig, image_size: int, drop_path_rate: float = 0.0) -> None:
        # timm imports torch._dynamo (seconds): only when a SAN is built, not when cat_seg.modeling is imported.
        from timm.models.vision_transformer import Block

        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(image_size, config.patch_size, config.width)
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.empty(1, grid[0] * grid[1], config.width))
        self.norm_pre = nn.Identity()
        rates = (
            torch.linspace(0, drop_path_rate, config.depth).tolist()
            if drop_path_rate
            else [0.0] * config.depth
        )
        self.blocks = nn.ModuleList(
            Block(
                config.width,
                config.heads,
                mlp_ratio=4.0,
                qkv_bias=True,
                drop_path=rate,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
            )
            for rate in rates
        )
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def num_features(self) -> int:
        return self.config.width

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(1, h*w, C): the position embedding, bicubically resized to the token grid when it differs."""
        pos = self.pos_embed
        if pos.shape[1] == grid[0] * grid[1]:
            return pos
        side_h, side_w = self.patch_embed.grid_size
        pos = rearrange(pos, "1 (h w) c -> 1 c h w", h=side_h, w=side_w)
        pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
        return rearrange(pos, "1 c h w -> 1 (h w) c")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of (B, C, H, W) maps (ConvNeXt's variant, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class AddFusion(nn.Module):
    """Adds a projected CLIP feature map to the side tokens: ``x + resize(conv1x1(LN(y)))``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.input_proj = nn.Sequential(LayerNorm2d(in_channels), nn.Conv2d(in_channels, out_channels, 1))
        conv = self.input_proj[1]
        if not conv.weight.is_meta:  # detectron2's c2_xavier_fill
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor, y: Tensor, grid: tuple[int, int]) -> Tensor:
        """x: (B, h*w, C) side tokens; y: (B, C_clip, h', w') CLIP map -> (B, h*w, C)."""
        y = F.interpolate(self.input_proj(y.contiguous()), size=grid, mode="bilinear", align_corners=False)
        return x + rearrange(y, "b c h w -> b (h w) c")


class MLP(nn.Module):
    """``num_layers`` affine layers with ReLU between (Linear, or 1x1 Conv2d for maps)."""

    def __init__(
        self, in_dim: int, hidden: int, out_dim: int, num_layers: int, *, conv: bool = False
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        make = (lambda i, o: nn.Conv2d(i, o, kernel_size=1)) if conv else nn.Linear
        self.layers = nn.ModuleList(make(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == last else F.relu(layer(x))
        return x


class MLPMaskDecoder(nn.Module):
    """Query and pixel embeddings -> mask logits; an attention-bias branch -> one bias per CLIP head.

    Args:
        in_channels: side ViT width.
        total_heads: CLIP heads (``ATTN_BIAS.NUM_HEADS``).
        total_layers: biases per query (``ATTN_BIAS.NUM_LAYERS``; 1: shared by all recognition blocks).
        embed_channels, mlp_channels, mlp_num_layers: the MLPs' sizes.
        rescale_attn_bias: a learnt affine map of the bias (``bias_scaling``, Linear(1, 1)).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        total_heads: int = 1,
        total_layers: int = 1,
        embed_channels: int = 256,
        mlp_channels: int = 256,
        mlp_num_layers: int = 3,
        rescale_attn_bias: bool = False,
    ) -> None:
        super().__init__()
        self.total_heads = int(total_heads)
        self.total_layers = int(total_layers)
        self.query_mlp = MLP(in_channels, mlp_channels, embed_channels, mlp_num_layers)
        self.pix_mlp = MLP(in_channels, mlp_channels, embed_channels, mlp_num_layers, conv=True)
        self.attn_mlp = MLP(
            in_channels,
            mlp_channels,
            embed_channels * self.total_heads * self.total_layers,
            mlp_num_layers,
            conv=True,
        )
        self.bias_scaling = nn.Linear(1, 1) if rescale_attn_bias else nn.Identity()

    def forward(self, query: Tensor, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """query: (B, Q, C); x: (B, C, h, w) -> masks (B, Q, h, w) and ``total_layers`` biases (B, heads, Q, h, w)."""
        query = self.query_mlp(query)
        pix = self.pix_mlp(x)
        b, c, h, w = pix.shape
        masks = torch.einsum("bqc,bchw->bqhw", query, pix)
        attn = self.attn_mlp(x).reshape(b, self.total_layers, self.total_heads, c, h, w)
        bias = torch.einsum("bqc,blnchw->blnqhw", query, attn)
        bias = self.bias_scaling(bias[..., None]).squeeze(-1)
        return masks, [bias[:, i] for i in range(self.total_layers)]


class RegionwiseSideAdapterNetwork(nn.Module):
    """The side adapter: query tokens + image tokens through the side ViT, CLIP features added at the
    blocks of ``fusion_map``, masks and attention biases decoded after the blocks of ``deep_supervision``.

    Args:
        vit_model: the side ViT.
        clip_width: CLIP image-tower width.
        num_queries: Q (100 in the released models).
        fusion_map: side block index (0 = before the first block) -> CLIP output index (0 = after
            ``ln_pre``, i = after block i); ``MODEL.SIDE_ADAPTER.FUSION_MAP`` ``"clip->side"`` strings give it.
        deep_supervision: side blocks (1-based) whose outputs are decoded in training; the last one is
            the prediction.
        mask_decoder: the :class:`MLPMaskDecoder`.
    """

    def __init__(
        self,
        *,
        vit_model: SideViT,
        clip_width: int,
        num_queries: int,
        fusion_map: Mapping[int, int],
        deep_supervision: Sequence[int],
        mask_decoder: MLPMaskDecoder,
    ) -> None:
        super().__init__()
        width = vit_model.num_features
        self.query_embed = nn.Parameter(torch.zeros(1, num_queries, width))
        self.query_pos_embed = nn.Parameter(torch.zeros(1, num_queries, width))
        if not self.query_embed.is_meta:
            nn.init.normal_(self.query_embed, std=0.02)
            nn.init.normal_(self.query_pos_embed, std=0.02)
        self.vit_model = vit_model
        self.fusion_map = {int(k): int(v) for k, v in fusion_map.items()}
        self.fusion_layers = nn.ModuleDict(
            {f"layer_{side}": AddFusion(clip_width, width) for side in self.fusion_map}
        )
        self.mask_decoder = mask_decoder
        self.num_queries = int(num_queries)
        self.deep_supervision = [int(i) for i in deep_supervision]
        if not self.deep_supervision or max(self.deep_supervision) != len(vit_model.blocks):
            raise ValueError(
                f"MODEL.SIDE_ADAPTER.DEEP_SUPERVISION_IDXS must end with the last side block "
                f"({len(vit_model.blocks)}), got {self.deep_supervision}"
            )

    @property
    def clip_layers(self) -> set[int]:
        """The CLIP outputs the fusion reads."""
        return set(self.fusion_map.values())

    def _fuse(
        self,
        block: int,
        x: Tensor,
        clip_features: Mapping[int, Tensor],
        clip_grid: tuple[int, int],
        grid: tuple[int, int],
    ) -> Tensor:
        if block not in self.fusion_map:
            return x
        patches = grid[0] * grid[1]
        clip = clip_features[self.fusion_map[block]]  # (B, 1 + P', D), CLS first
        clip_map = rearrange(clip[:, 1:], "b (h w) c -> b c h w", h=clip_grid[0])
        fused = self.fusion_layers[f"layer_{block}"](x[:, -patches:], clip_map, grid)
        return torch.cat([x[:, :-patches], fused], dim=1)

    def forward(
        self, images: Tensor, clip_features: Mapping[int, Tensor], clip_grid: tuple[int, int]
    ) -> tuple[list[Tensor], list[list[Tensor]]]:
        """Decode masks and attention biases.

        Args:
            images: (B, 3, H, W) normalised, padded images at full resolution.
            clip_features: the extractor's outputs by index ((B, 1 + h*w, D), CLS first).
            clip_grid: the CLIP token grid (h, w).
        Returns:
            mask logits (B, Q, H/p, W/p) and biases (lists of (B, heads, Q, H/p, W/p)), one per decoded
            block: every ``deep_supervision`` block in training mode, the last one in eval mode.
        """
        vit = self.vit_model
        x, grid = vit.patch_embed(images)
        patches = x.shape[1]
        batch = x.shape[0]
        pos = torch.cat(
            [self.query_pos_embed.expand(batch, -1, -1), vit.position_embedding(grid).expand(batch, -1, -1)],
            dim=1,
        )
        x = torch.cat([self.query_embed.expand(batch, -1, -1), x], dim=1) + pos
        x = vit.norm_pre(x)
        x = self._fuse(0, x, clip_features, clip_grid, grid)
        decode = self.deep_supervision if self.training else self.deep_supervision[-1:]
        outputs: list[tuple[Tensor, Tensor]] = []
        for i, block in enumerate(vit.blocks, start=1):
            x = self._fuse(i, block(x), clip_features, clip_grid, grid)
            if i in decode:
                pix = rearrange(x[:, -patches:], "b (h w) c -> b c h w", h=grid[0])
                outputs.append((x[:, :-patches], pix))
            if i < len(vit.blocks):
                x = x + pos
        masks, biases = [], []
        for query, pix in outputs:
            m, b = self.mask_decoder(query, pix)
            masks.append(m)
            biases.append(b)
        return masks, biases
