"""CLIP image and text towers in the layout CAT-Seg and SemLA checkpoints use.

Parameter names follow OpenAI CLIP (``visual.transformer.resblocks.N.attn...``) so that the released
CAT-Seg checkpoint and the released SemLA adapters address the same modules. The one change from
OpenAI CLIP is the attention: the query, key and value projections are three separate ``nn.Linear``
modules (``attn.q_proj``, ``attn.k_proj``, ``attn.v_proj``, bias-free, the biases stay in the packed
``attn.in_proj_bias``) that the forward pass really calls, so a LoRA attached to them takes effect.
In the original code these Linear modules were shells that the forward pass never called.

Checkpoints spell these weights in three ways, all accepted by :meth:`Attention._load_from_state_dict`:
``attn.in_proj_weight`` (OpenAI CLIP / open_clip: packed, split into q/k/v), ``attn.q_proj_weight``
(upstream CAT-Seg) and ``attn.q_proj.weight`` (SemLA, which saves both of the last two spellings).
The state dict of this module writes both ``attn.q_proj_weight`` and ``attn.q_proj.weight``, as the
SemLA checkpoints do.

Tensors are batch-first throughout: tokens are (B, L, D).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_QKV = ("q", "k", "v")


@dataclass(frozen=True)
class CLIPConfig:
    """Hyper-parameters of a CLIP model (OpenAI naming; heads = width // 64 for the released models)."""

    embed_dim: int
    image_size: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of the OpenAI CLIP models."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with separate, really-called q/k/v projections.

    Args:
        width: model width D.
        heads: number of heads; D must be divisible by it.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.num_heads = heads
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)

    def _projection(self, which: str) -> nn.Module:
        return getattr(self, f"{which}_proj")

    def project(self, x: Tensor, which: str) -> Tensor:
        """Apply the ``which`` in {q, k, v} projection (Linear module + its slice of ``in_proj_bias``)."""
        index = _QKV.index(which)
        bias = self.in_proj_bias.chunk(3)[index]
        return self._projection(which)(x) + bias

    def forward(self, x: Tensor, *, causal: bool = False, attn_mask: Tensor | None = None) -> Tensor:
        """Self-attention over tokens.

        Args:
            x: (B, L, D) tokens.
            causal: mask future tokens (text tower).
            attn_mask: a float mask added to the attention logits, broadcastable to (B, heads, L, L)
                (SAN's recognition blocks); not together with ``causal``.
        Returns:
            (B, L, D).
        """
        q, k, v = (rearrange(self.project(x, w), "b l (h d) -> b h l d", h=self.num_heads) for w in _QKV)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))

    # -- checkpoint compatibility -------------------------------------------------------------
    def _linear_weight_key(self, which: str) -> str:
        """State-dict key (relative to this module) of the Parameter behind ``<which>_proj``.

        After PEFT wraps the Linear, its weight lives under ``<which>_proj.base_layer.weight``.
        """
        module = self._projection(which)
        if hasattr(module, "base_layer"):
            return f"{which}_proj.base_layer.weight"
        return f"{which}_proj.weight"

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # The SemLA state dict lists the tied aliases ``attn.{q,k,v}_proj_weight`` first.
        for which in _QKV:
            weight = self._projection(which).weight
            destination[f"{prefix}{which}_proj_weight"] = weight if keep_vars else weight.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Rewrite the other spellings of the q/k/v weights onto the Linear modules' keys before the
        # children load (children read the same dict after this method returns).
        packed = state_dict.pop(f"{prefix}in_proj_weight", None)
        if packed is not None:
            if packed.shape[0] % 3:
                error_msgs.append(f"{prefix}in_proj_weight: first dimension {packed.shape[0]} is not 3*D")
            else:
                for which, part in zip(_QKV, packed.chunk(3)):
                    state_dict.setdefault(f"{prefix}{which}_proj_weight", part)
        for which in _QKV:
            alias = state_dict.pop(f"{prefix}{which}_proj_weight", None)
            target = f"{prefix}{self._linear_weight_key(which)}"
            if alias is not None:
                state_dict.setdefault(target, alias)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    def __init__(self, width: int, heads: int, *, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.attn = Attention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D); ``attn_mask``: see :meth:`Attention.forward`."""
        x = x + self.attn(self.ln_1(x), causal=self.causal, attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))

    def forward_dense(self, x: Tensor) -> Tensor:
        """CAT-Seg's last visual block for dense features (no attention mixing).

        Every token takes the value path (v projection, then ``out_proj``) of itself, plus the input
        CLS token as residual, then the MLP. The q and k streams of the original are discarded there,
        so they are not computed.

        Args:
            x: (B, L, D) tokens, CLS first.
        Returns:
            (B, L, D).
        """
        v = self.attn.out_proj(self.attn.project(self.ln_1(x), "v"))
        v = v + x[:, :1]
        return v + self.mlp(self.ln_2(v))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` s under the name ``resblocks``."""

    def __init__(self, width: int, layers: int, heads: int, *, causal: bool = False) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, causal=causal) for _ in range(layers)]
        )

    def forward(
        self, x: Tensor, *, dense: bool = False, intermediates: Sequence[int] = ()
    ) -> tuple[Tensor, list[Tensor]]:
        """Run all blocks.

        Args:
            x: (B, L, D) tokens.
            dense: run the last block with :meth:`ResidualAttentionBlock.forward_dense`.
            intermediates: block indices whose outputs to return (0-based, in the given order).
        Returns:
            the final tokens (B, L, D) and the requested block outputs, each (B, L, D).
        """
        wanted = {int(i) % len(self.resblocks): None for i in intermediates}
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            x = block.forward_dense(x) if (dense and i == last) else block(x)
            if i in wanted:
                wanted[i] = x
        return x, [wanted[int(i) % len(self.resblocks)] for i in intermediates]


def _building_on_meta() -> bool:
    """Whether new tensors go to the meta device (a shapes-only build, ``build_model(cfg, "meta")``).

    Random initialisation is skipped there: meta tensors hold no values, and on meta ``randn``,
    ``normal_`` and products with a scalar run Python decompositions that import sympy and
    ``torch._dynamo`` (about 6 s of start-up for every command that checks a model on meta first).
    """
    return torch.get_default_device().type == "meta"


def _scaled_randn(scale: float, *shape: int) -> Tensor:
    """``scale * torch.randn(*shape)``, uninitialised on meta (see :func:`_building_on_meta`)."""
    if _building_on_meta():
        return torch.empty(*shape)
    return scale * torch.randn(*shape)


def resize_positional_embedding(pos: Tensor, side: int, grid_h: int, grid_w: int) -> Tensor:
    """A CLIP positional embedding (CLS first, then a ``side`` x ``side`` grid) for a (grid_h, grid_w) token
    grid: the grid part resized bicubically (``align_corners=False``), as CAT-Seg and SAN do.

    Returns:
        (1 + grid_h * grid_w, width); ``pos`` itself when the grid is unchanged.
    """
    if (grid_h, grid_w) == (side, side):
        return pos
    grid = rearrange(pos[1:], "(h w) d -> 1 d h w", h=side)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], rearrange(grid, "1 d h w -> (h w) d")], dim=0)


class VisionTransformer(nn.Module):
    """CLIP ViT image tower.

    Args:
        image_size: the pre-training resolution; sets the size of ``positional_embedding``.
        patch_size: patch side in pixels.
        width: token width.
        layers: number of blocks.
        heads: attention heads.
        output_dim: width after ``proj``.
    """

    def __init__(
        self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.output_dim = output_dim
        grid = image_size // patch_size
        scale = width**-0.5
        self.class_embedding = nn.Parameter(_scaled_randn(scale, width))
        self.positional_embedding = nn.Parameter(_scaled_randn(scale, grid * grid + 1, width))
        self.proj = nn.Parameter(_scaled_randn(scale, width, output_dim))
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)

    def resized_positional_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """Positional embedding for a (grid_h, grid_w) token grid, bicubically resized as CAT-Seg does.

        Returns:
            (1 + grid_h * grid_w, width), CLS position first.
        """
        return resize_positional_embedding(
            self.positional_embedding, self.image_size // self.patch_size, grid_h, grid_w
        )

    def forward_intermediates(
        self, images: Tensor, *, dense: bool = True, indices: Sequence[int] = ()
    ) -> tuple[Tensor, list[Tensor]]:
        """Encode images; return the projected tokens and raw intermediate block outputs.

        Args:
            images: (B, 3, H, W) normalised images; H and W multiples of the patch size.
            dense: CAT-Seg's dense mode (last block without attention mixing, all tokens returned).
            indices: blocks whose outputs (residual stream, before ``ln_post``) to return.
        Returns:
            tokens: (B, 1 + h*w, output_dim) after ``ln_post`` and ``proj`` if dense, else (B, output_dim)
                for the CLS token.
            intermediates: one (B, 1 + h*w, width) tensor per index, CLS token first.
        """
        x = self.conv1(images)  # (B, width, h, w)
        grid_h, grid_w = x.shape[-2:]
        x = rearrange(x, "b d h w -> b (h w) d")
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + h*w, width)
        x = x + self.resized_positional_embedding(grid_h, grid_w).to(x.dtype)
        x = self.ln_pre(x)
        x, inter = self.transformer(x, dense=dense, intermediates=indices)
        x = self.ln_post(x if dense else x[:, 0])
        return x @ self.proj, inter

    def forward(self, images: Tensor, *, dense: bool = False) -> Tensor:
        """(B, 3, H, W) -> (B, output_dim), or (B, 1 + h*w, output_dim) if ``dense``."""
        return self.forward_intermediates(images, dense=dense)[0]


class CLIP(nn.Module):
    """CLIP with the OpenAI parameter layout: ``visual`` tower plus the text tower at the top level."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.context_length = config.context_length
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        # full(), not ones() * x: see _building_on_meta.
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        self.visual = VisionTransformer(
            image_size=config.image_size,
            patch_size=config.vision_patch_size,
            width=config.vision_width,
            layers=config.vision_layers,
            heads=config.vision_heads,
            output_dim=config.embed_dim,
        )
        self.transformer = Transformer(config.text_width, config.text_layers, config.text_heads, causal=True)
        # On meta, a given (empty) weight skips nn.Embedding's own normal_ init (see _building_on_meta).
        empty = torch.empty(config.vocab_size, config.text_width) if _building_on_meta() else None
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width, _weight=empty)
        self.ln_final = nn.LayerNorm(config.text_width)
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self) -> None:
        """Random initialisation following the CLIP recipe (used for tiny models and tests); none on meta."""
        if self.token_embedding.weight.is_meta:
            return
        c = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=c.text_width**-0.5)
        for tower in (self.transformer, self.visual.transformer):
            width, layers = tower.width, len(tower.resblocks)
            proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
            attn_std = width**-0.5
            fc_std = (2 * width) ** -0.5
            for block in tower.resblocks:
                for which in _QKV:
                    nn.init.normal_(block.attn._projection(which).weight, std=attn_std)
                nn.init.zeros_(block.attn.in_proj_bias)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: Tensor, *, dense: bool = False) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, embed_dim), or (B, 1 + h*w, embed_dim) if ``dense``."""
        return self.visual(images.to(self.dtype), dense=dense)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Embed token sequences (not normalised).

        The features are read at each sequence's end-of-text token (the highest token id). With the
        causal mask, tokens after the last end-of-text position cannot change them, so the sequences
        are cut there first: exact, and much cheaper than the full context for short prompts.

        Args:
            tokens: (N, context_length) int64 BPE ids.
        Returns:
            (N, embed_dim).
        """
        eot = tokens.argmax(dim=-1)  # (N,)
        length = int(eot.max().item()) + 1 if tokens.numel() else 1
        x = self.token_embedding(tokens[:, :length]).to(self.dtype)  # (N, length, width)
        x = x + self.positional_embedding[:length].to(x.dtype)
        x, _ = self.transformer(x)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return x @ self.text_projection


def clip_trainable_mask(name: str, mode: str) -> bool:
    """Whether a CLIP parameter trains under CAT-Seg's ``CLIP_FINETUNE`` mode.

    ``attention`` (the CAT-Seg default): inside the transformer blocks, the q and v projection weights
    of both towers (and any positional parameter inside a block, of which there is none);
    ``full``: everything inside the transformer blocks; ``none``: nothing. Parameters outside the blocks
    (embeddings, ``ln_post``, ``proj``, ...) are always frozen, as in CAT-Seg.

    Args:
        name: parameter name relative to the CLIP module (e.g. ``visual.transformer.resblocks.0.attn.q_proj.weight``).
        mode: one of ``attention``, ``full``, ``none``, ``prompt``.
    """
    if mode not in ("attention", "full", "none", "prompt"):
        raise ValueError(f"MODEL.SEM_SEG_HEAD.CLIP_FINETUNE must be attention/full/none/prompt, got {mode!r}")
    if "transformer" not in name:
        return False
    if mode == "full":
        return True
    if mode == "attention":
        if "attn" in name:
            return "q_proj" in name or "v_proj" in name
        return "position" in name
    if mode == "prompt":
        return "prompt" in name
    return False
