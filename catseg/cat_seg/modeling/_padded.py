"""The aggregator's computation as the original CAT-Seg code does it, kept as an oracle.

The model never uses this module. Tests compare the model against it, and ``bench/catseg_speed.py``
times it as the baseline; it is not a configuration option. :func:`padded_computation` swaps these
forwards into a model for the duration of a ``with`` block:

- :func:`class_attention_padded`: the class axis padded from T to ``pad_len`` with materialised copies
  of the learnt padding token and guidance, all of them normalised, projected, attended and passed
  through the MLP, then dropped; the text guidance repeated over every position.
- :func:`window_attention_explicit`: window attention as an explicit softmax of ``q k^T + mask``.
- :func:`swin_block_copying` / :func:`swin_wrapper_copying`: the appearance guidance repeated over the
  classes and normalised once per class; roll, window partition and merge as copies.
- :func:`up_copying`: the decoder guidance repeated over the classes and concatenated.
- :func:`aggregator_padded`: the cost volume and the layers in the original layout.

The code is the project's implementation before the class attention stopped materialising its padding
(same operations, same order), so the padded figures in ``bench/BENCHMARKS.md`` are those of that code.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .aggregator import (
    Aggregator,
    AttentionLayer,
    ClassTransformerLayer,
    SwinTransformerBlock,
    SwinTransformerBlockWrapper,
    Up,
    WindowAttention,
    window_partition,
)


def window_merge(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window * window, C) -> (B, H, W, C)."""
    return rearrange(
        windows,
        "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c",
        nh=height // window,
        nw=width // window,
        wh=window,
    )


def linear_attention_padded(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """Linear attention (elu + 1 feature map) over all S keys: (N, L, H, D), (N, S, H, D), (N, S, H, V)."""
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    length = v.shape[1]
    v = v / length
    kv = torch.einsum("nshd,nshv->nhdv", k, v)
    z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * length


def full_attention_padded(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention, (N, L, H, D) x (N, S, H, D) x (N, S, H, V) -> (N, L, H, V)."""
    scale = q.shape[-1] ** -0.5
    attn = torch.einsum("nlhd,nshd->nhls", q * scale, k).softmax(dim=-1)
    return torch.einsum("nhls,nshv->nlhv", attn, v)


def attention_layer_padded(self: AttentionLayer, x: Tensor, guidance: Tensor | None) -> Tensor:
    """:class:`AttentionLayer` on all rows: (N, S, dim) tokens, (N, S, Cg) guidance -> (N, S, dim)."""
    qk_in = torch.cat([x, guidance], dim=-1) if guidance is not None else x
    q = rearrange(self.q(qk_in), "n l (h d) -> n l h d", h=self.heads)
    k = rearrange(self.k(qk_in), "n s (h d) -> n s h d", h=self.heads)
    v = rearrange(self.v(x), "n s (h d) -> n s h d", h=self.heads)
    attend = linear_attention_padded if self.attention_type == "linear" else full_attention_padded
    return rearrange(attend(q, k, v), "n l h d -> n l (h d)")


def class_attention_padded(self: ClassTransformerLayer, x: Tensor, guidance: Tensor | None) -> Tensor:
    """:class:`ClassTransformerLayer` with the class axis padded to ``pad_len`` by copies.

    Args:
        x: (B, C, T, H, W).
        guidance: (B, T, Cg) projected text guidance, or None.
    Returns:
        (B, C, T, H, W).
    """
    batch, _, classes, height, width = x.shape
    pooled = rearrange(x, "b c t h w -> (b t) c h w")
    if self.pooling_size != (1, 1):
        pooled = F.avg_pool2d(pooled, self.pooling_size)
    ph, pw = pooled.shape[-2:]
    pooled = rearrange(pooled, "(b t) c h w -> b c t h w", b=batch)
    pad = self.pad_len - classes if self.padding_tokens is not None else 0
    if pad > 0:
        tokens = repeat(self.padding_tokens, "1 1 c -> b c t h w", b=batch, t=pad, h=ph, w=pw)
        pooled = torch.cat([pooled, tokens], dim=2)
    seq = rearrange(pooled, "b c t h w -> (b h w) t c")
    if guidance is not None:
        if pad > 0 and self.padding_guidance is not None:
            extra = repeat(self.padding_guidance, "1 1 c -> b t c", b=batch, t=pad)
            guidance = torch.cat([guidance, extra], dim=1)
        guidance = repeat(guidance, "b t c -> (b h w) t c", h=ph, w=pw)
    seq = seq + attention_layer_padded(self.attention, self.norm1(seq), guidance)
    seq = seq + self.MLP(self.norm2(seq))
    out = rearrange(seq, "(b h w) t c -> (b t) c h w", b=batch, h=ph)
    if (ph, pw) != (height, width):
        out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=True)
    out = rearrange(out, "(b t) c h w -> b c t h w", b=batch)
    return x + out[:, :, :classes]


def window_attention_explicit(self: WindowAttention, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """:class:`WindowAttention` on partitioned windows: (B*nW, N, dim + Cg), (nW, N, N) -> (B*nW, N, dim)."""
    q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads) * self.scale
    k = rearrange(self.k(x), "b n (h d) -> b h n d", h=self.heads)
    v = rearrange(self.v(x[..., : self.dim]), "b n (h d) -> b h n d", h=self.heads)
    attn = q @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
    if mask is not None:
        num_windows = mask.shape[0]
        attn = rearrange(attn, "(b w) h n m -> b w h n m", w=num_windows) + mask[None, :, None]
        attn = rearrange(attn, "b w h n m -> (b w) h n m")
    out = attn.softmax(dim=-1) @ v
    return self.proj(rearrange(out, "b h n d -> b n (h d)"))


def swin_block_copying(self: SwinTransformerBlock, x: Tensor, guidance: Tensor | None) -> Tensor:
    """:class:`SwinTransformerBlock` with roll, partition and merge as copies.

    Args:
        x: (B*T, H*W, dim).
        guidance: (B*T, H*W, Cg) normalised appearance guidance (repeated per class), or None.
    Returns:
        (B*T, H*W, dim).
    """
    height, width = self.resolution
    shortcut = x
    y = rearrange(self.norm1(x), "b (h w) c -> b h w c", h=height)
    if guidance is not None:
        y = torch.cat([y, rearrange(guidance, "b (h w) c -> b h w c", h=height)], dim=-1)
    if self.shift:
        y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
    y = self.attn(window_partition(y, self.window), mask=self.attn_mask)
    y = window_merge(y, self.window, height, width)
    if self.shift:
        y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
    x = shortcut + rearrange(y, "b h w c -> b (h w) c")
    return x + self.mlp(self.norm2(x))


def swin_wrapper_copying(self: SwinTransformerBlockWrapper, x: Tensor, guidance: Tensor | None) -> Tensor:
    """:class:`SwinTransformerBlockWrapper` with the guidance repeated and normalised per class.

    Args:
        x: (B, C, T, H, W).
        guidance: (B, Cg, H, W), or None.
    Returns:
        (B, C, T, H, W).
    """
    batch, _, classes, height, width = x.shape
    x = rearrange(x, "b c t h w -> (b t) (h w) c")
    if guidance is not None and self.guidance_norm is not None:
        guidance = self.guidance_norm(repeat(guidance, "b c h w -> (b t) (h w) c", t=classes))
    x = self.block_1(x, guidance)
    x = self.block_2(x, guidance)
    return rearrange(x, "(b t) (h w) c -> b c t h w", b=batch, h=height, w=width)


def up_copying(self: Up, x: Tensor, guidance: Tensor | None) -> Tensor:
    """:class:`Up` with the guidance repeated per class: (B*T, C, H, W), (B, Cg, 2H, 2W) -> (B*T, C', 2H, 2W)."""
    x = self.up(x)
    if guidance is not None:
        guidance = repeat(guidance, "b c h w -> (b t) c h w", t=x.shape[0] // guidance.shape[0])
        x = torch.cat([x, guidance], dim=1)
    return self.conv(x)


def aggregator_padded(self: Aggregator, image: Tensor, text: Tensor, guidance: Sequence[Tensor]) -> Tensor:
    """:class:`Aggregator` in the original layout: (B, C, H, W), (B, T, P, C), guidance -> (B, T, 4H, 4W)."""
    num_classes = text.shape[1]
    corr = self.correlation(image, text)  # (B, P, T, H, W)
    kept = None
    if self.pad_len > 0 and num_classes > self.pad_len:
        peak = rearrange(corr, "b p t h w -> b t (p h w)").max(dim=-1).values  # (B, T)
        kept = peak.topk(self.pad_len, dim=-1, sorted=False).indices  # (B, pad_len)
        text = torch.gather(
            F.normalize(text, dim=-1), 1, kept[..., None, None].expand(-1, -1, *text.shape[-2:])
        )
        corr = self.correlation(image, text)
    batch = corr.shape[0]
    x = self.conv1(rearrange(corr, "b p t h w -> (b t) p h w"))
    x = rearrange(x, "(b t) c h w -> b c t h w", b=batch)  # (B, hidden, T, H, W)
    appearance = self.guidance_projection(guidance[0]) if self.guidance_projection is not None else None
    decoder_guidance: list[Tensor | None] = [None, None]
    if self.decoder_guidance_projection is not None:
        decoder_guidance = [p(g) for p, g in zip(self.decoder_guidance_projection, guidance[1:])]
    text_guidance = None
    if self.text_guidance_projection is not None:
        text_guidance = self.text_guidance_projection(F.normalize(text.mean(dim=-2), dim=-1))
    for layer in self.layers:
        x = layer.attention(layer.swin_block(x, appearance), text_guidance)
    y = rearrange(x, "b c t h w -> (b t) c h w")
    y = self.decoder1(y, decoder_guidance[0])
    y = self.decoder2(y, decoder_guidance[1])
    logits = rearrange(self.head(y), "(b t) 1 h w -> b t h w", b=batch)
    if kept is not None:
        out = logits.new_full((batch, num_classes, *logits.shape[-2:]), -100.0)
        logits = out.scatter(1, kept[..., None, None].expand(-1, -1, *logits.shape[-2:]), logits)
    return logits


#: The original forward of each module class whose computation changed.
ORIGINAL_FORWARDS: dict[type[nn.Module], object] = {
    Aggregator: aggregator_padded,
    SwinTransformerBlockWrapper: swin_wrapper_copying,
    SwinTransformerBlock: swin_block_copying,
    WindowAttention: window_attention_explicit,
    ClassTransformerLayer: class_attention_padded,
    Up: up_copying,
}


@contextlib.contextmanager
def padded_computation(model: nn.Module) -> Iterator[None]:
    """Make the aggregator inside ``model`` compute as the original code, for the ``with`` block.

    Parameters and buffers are untouched (the same weights serve both computations); the ``forward``
    of each aggregator module is replaced by the original one and restored on exit, also when the block
    raises. Modules are still called as modules, so hooks and LoRA wrappers see the same calls.
    """
    patched = [m for m in model.modules() if type(m) in ORIGINAL_FORWARDS]
    if any("forward" in m.__dict__ for m in patched):
        raise RuntimeError("padded_computation blocks cannot be nested")
    try:
        for module in patched:
            module.forward = types.MethodType(ORIGINAL_FORWARDS[type(module)], module)
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
