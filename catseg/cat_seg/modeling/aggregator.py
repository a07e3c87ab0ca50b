"""CAT-Seg cost aggregation: cost volume, spatial (swin) and class (linear attention) aggregation, decoder.

Shape letters: B batch (views), C channels, T classes, P prompt templates, H x W the CLIP token grid.
Parameter names follow the released CAT-Seg checkpoints (``layers.N.swin_block.block_1.attn.q``, ...),
because SemLA's adapters address these modules by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (the layout of timm's ``Mlp``: ``fc1``/``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B * H/window * W/window, window * window, C)."""
    return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=window, ww=window)


def window_merge(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window * window, C) -> (B, H, W, C)."""
    return rearrange(
        windows,
        "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c",
        nh=height // window,
        nw=width // window,
        wh=window,
    )


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> Tensor:
    """Swin's attention mask for cyclically shifted windows.

    Tokens that came from different regions before the cyclic shift must not attend to each other
    inside a window: their pair gets -100 (as in Swin), others 0.

    Returns:
        (nW, window * window, window * window) float mask, nW = (H / window) * (W / window), on the
        default device.
    """
    # Computed on the CPU and then moved: on the meta device (a shapes-only build) this indexing runs
    # Python decompositions that import torch._dynamo, seconds of start-up for a constant.
    region = torch.zeros(1, height, width, 1, device="cpu")
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            region[:, hs, ws, :] = label
            label += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, window*window)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    mask = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
    return mask.to(torch.get_default_device())


class WindowAttention(nn.Module):
    """Window self-attention whose queries and keys also see the appearance guidance.

    q, k: Linear(dim + guidance_dim -> dim) on [tokens, guidance]; v: Linear(dim -> dim) on tokens only;
    then ``proj``. No relative position bias (as in CAT-Seg).
    """

    def __init__(self, dim: int, guidance_dim: int, heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention inside windows.

        Args:
            x: (B*nW, N, dim + guidance_dim) window tokens with guidance concatenated.
            mask: (nW, N, N) additive mask or None.
        Returns:
            (B*nW, N, dim).
        """
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


class SwinTransformerBlock(nn.Module):
    """Pre-LN (shifted-)window attention block with appearance guidance, then an MLP.

    Args:
        dim: token width.
        guidance_dim: appearance-guidance width (concatenated before q and k).
        resolution: (H, W) token grid.
        heads: attention heads.
        window: window side.
        shift: cyclic shift (0 or window // 2).
    """

    def __init__(
        self, dim: int, guidance_dim: int, resolution: Sequence[int], heads: int, window: int, shift: int
    ) -> None:
        super().__init__()
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.window = window
        self.shift = shift
        if min(self.resolution) <= window:
            # As in Swin: a window covering the whole grid needs no shift.
            self.window, self.shift = min(self.resolution), 0
        if shift > 0 and self.shift > 0:
            self.register_buffer("attn_mask", shifted_window_mask(*self.resolution, self.window, self.shift))
        else:
            self.attn_mask = None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, guidance_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4)

    def forward(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        """Args:
            x: (B, H*W, dim).
            guidance: (B, H*W, guidance_dim) normalised appearance guidance, or None.
        Returns:
            (B, H*W, dim).
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


class SwinTransformerBlockWrapper(nn.Module):
    """Spatial aggregation: a window block then a shifted-window block, per class."""

    def __init__(
        self, dim: int, guidance_dim: int, resolution: Sequence[int], heads: int, window: int
    ) -> None:
        super().__init__()
        self.block_1 = SwinTransformerBlock(dim, guidance_dim, resolution, heads, window, shift=0)
        self.block_2 = SwinTransformerBlock(dim, guidance_dim, resolution, heads, window, shift=window // 2)
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim > 0 else None

    def forward(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        """Args:
            x: (B, C, T, H, W) cost embedding.
            guidance: (B, Cg, H, W) projected appearance guidance, or None.
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


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """Linear attention with the elu + 1 feature map (Katharopoulos et al. 2020, as used by CAT-Seg).

    Values are divided by the sequence length and the result multiplied back (an fp16 overflow guard
    of the original; kept so that results match to the last bit pattern the maths allows).

    Args:
        q: (N, L, H, D) queries.
        k: (N, S, H, D) keys.
        v: (N, S, H, V) values.
    Returns:
        (N, L, H, V).
    """
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    length = v.shape[1]
    v = v / length
    kv = torch.einsum("nshd,nshv->nhdv", k, v)
    z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * length


def full_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention, (N, L, H, D) x (N, S, H, D) x (N, S, H, V) -> (N, L, H, V)."""
    scale = q.shape[-1] ** -0.5
    attn = torch.einsum("nlhd,nshd->nhls", q * scale, k).softmax(dim=-1)
    return torch.einsum("nhls,nshv->nlhv", attn, v)


class AttentionLayer(nn.Module):
    """Class attention: q, k see [tokens, text guidance], v sees the tokens; no output projection."""

    def __init__(self, dim: int, guidance_dim: int, heads: int, attention_type: str = "linear") -> None:
        super().__init__()
        if attention_type not in ("linear", "full"):
            raise ValueError(f"ATTENTION_TYPE must be 'linear' or 'full', got {attention_type!r}")
        self.heads = heads
        self.attention_type = attention_type
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        """(N, T, dim) tokens and (N, T, guidance_dim) guidance -> (N, T, dim)."""
        qk_in = torch.cat([x, guidance], dim=-1) if guidance is not None else x
        q = rearrange(self.q(qk_in), "n l (h d) -> n l h d", h=self.heads)
        k = rearrange(self.k(qk_in), "n s (h d) -> n s h d", h=self.heads)
        v = rearrange(self.v(x), "n s (h d) -> n s h d", h=self.heads)
        attend = linear_attention if self.attention_type == "linear" else full_attention
        return rearrange(attend(q, k, v), "n l h d -> n l (h d)")


class ClassTransformerLayer(nn.Module):
    """Attention across classes at every (pooled) spatial position.

    The class axis is padded to ``pad_len`` with a learnt token (and a learnt guidance); the padding
    takes part in the attention, as in CAT-Seg, and is dropped afterwards.
    """

    def __init__(
        self,
        dim: int,
        guidance_dim: int,
        heads: int,
        *,
        attention_type: str = "linear",
        pooling_size: Sequence[int] = (1, 1),
        pad_len: int = 256,
    ) -> None:
        super().__init__()
        self.pooling_size = tuple(int(p) for p in pooling_size)
        self.attention = AttentionLayer(dim, guidance_dim, heads, attention_type)
        self.MLP = nn.Sequential(nn.Linear(dim, dim * 4), nn.ReLU(), nn.Linear(dim * 4, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.pad_len = pad_len
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim)) if pad_len > 0 else None
        self.padding_guidance = (
            nn.Parameter(torch.zeros(1, 1, guidance_dim)) if pad_len > 0 and guidance_dim > 0 else None
        )

    def forward(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        """Args:
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
        seq = seq + self.attention(self.norm1(seq), guidance)
        seq = seq + self.MLP(self.norm2(seq))
        out = rearrange(seq, "(b h w) t c -> (b t) c h w", b=batch, h=ph)
        if (ph, pw) != (height, width):
            out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=True)
        out = rearrange(out, "(b t) c h w -> b c t h w", b=batch)
        return x + out[:, :, :classes]


class AggregatorLayer(nn.Module):
    """Spatial aggregation followed by class aggregation."""

    def __init__(
        self,
        *,
        hidden_dim: int,
        text_guidance_dim: int,
        appearance_guidance_dim: int,
        heads: int,
        resolution: Sequence[int],
        pooling_size: Sequence[int],
        window: int,
        attention_type: str,
        pad_len: int,
    ) -> None:
        super().__init__()
        self.swin_block = SwinTransformerBlockWrapper(
            hidden_dim, appearance_guidance_dim, resolution, heads, window
        )
        self.attention = ClassTransformerLayer(
            hidden_dim,
            text_guidance_dim,
            heads,
            attention_type=attention_type,
            pooling_size=pooling_size,
            pad_len=pad_len,
        )

    def forward(self, x: Tensor, appearance: Tensor | None, text: Tensor | None) -> Tensor:
        """(B, C, T, H, W) -> (B, C, T, H, W)."""
        return self.attention(self.swin_block(x, appearance), text)


class DoubleConv(nn.Module):
    """(conv3x3 no bias -> GroupNorm(C/16) -> ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        groups = max(out_channels // 16, 1)
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.double_conv(x)


class Up(nn.Module):
    """2x transposed-conv upsampling, concatenation with guidance, then :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        """Args:
            x: (B*T, C, H, W).
            guidance: (B, Cg, 2H, 2W), shared by the T classes of each batch element, or None.
        Returns:
            (B*T, out_channels, 2H, 2W).
        """
        x = self.up(x)
        if guidance is not None:
            guidance = repeat(guidance, "b c h w -> (b t) c h w", t=x.shape[0] // guidance.shape[0])
            x = torch.cat([x, guidance], dim=1)
        return self.conv(x)


class Aggregator(nn.Module):
    """CAT-Seg's cost aggregation network (the predictor's ``transformer``).

    Args:
        text_guidance_dim / text_guidance_proj_dim: CLIP text width and its projection.
        appearance_guidance_dim / appearance_guidance_proj_dim: CLIP dense-feature width and projection.
        decoder_dims: output channels of the two upsampling stages.
        decoder_guidance_dims / decoder_guidance_proj_dims: channels of the res4/res5 guidance and
            their projections.
        num_layers, heads, hidden_dim: aggregation depth, heads and width.
        pooling_size: class-attention average pooling (1, 1 = none).
        feature_resolution: (H, W) CLIP token grid.
        window: swin window side.
        attention_type: ``linear`` or ``full`` class attention.
        prompt_channels: number of prompt templates P (input channels of the cost embedding).
        pad_len: class-axis padding; more classes than this keeps only the ``pad_len`` best-matching.
    """

    def __init__(
        self,
        *,
        text_guidance_dim: int = 512,
        text_guidance_proj_dim: int = 128,
        appearance_guidance_dim: int = 512,
        appearance_guidance_proj_dim: int = 128,
        decoder_dims: Sequence[int] = (64, 32),
        decoder_guidance_dims: Sequence[int] = (256, 128),
        decoder_guidance_proj_dims: Sequence[int] = (32, 16),
        num_layers: int = 4,
        heads: int = 4,
        hidden_dim: int = 128,
        pooling_size: Sequence[int] = (6, 6),
        feature_resolution: Sequence[int] = (24, 24),
        window: int = 12,
        attention_type: str = "linear",
        prompt_channels: int = 1,
        pad_len: int = 256,
    ) -> None:
        super().__init__()
        self.pad_len = pad_len
        self.layers = nn.ModuleList(
            [
                AggregatorLayer(
                    hidden_dim=hidden_dim,
                    text_guidance_dim=text_guidance_proj_dim,
                    appearance_guidance_dim=appearance_guidance_proj_dim,
                    heads=heads,
                    resolution=feature_resolution,
                    pooling_size=pooling_size,
                    window=window,
                    attention_type=attention_type,
                    pad_len=pad_len,
                )
                for _ in range(num_layers)
            ]
        )
        self.conv1 = nn.Conv2d(prompt_channels, hidden_dim, kernel_size=7, stride=1, padding=3)
        self.guidance_projection = (
            nn.Sequential(
                nn.Conv2d(appearance_guidance_dim, appearance_guidance_proj_dim, kernel_size=3, padding=1),
                nn.ReLU(),
            )
            if appearance_guidance_dim > 0
            else None
        )
        self.text_guidance_projection = (
            nn.Sequential(nn.Linear(text_guidance_dim, text_guidance_proj_dim), nn.ReLU())
            if text_guidance_dim > 0
            else None
        )
        self.decoder_guidance_projection = (
            nn.ModuleList(
                [
                    nn.Sequential(nn.Conv2d(d, dp, kernel_size=3, padding=1), nn.ReLU())
                    for d, dp in zip(decoder_guidance_dims, decoder_guidance_proj_dims)
                ]
            )
            if decoder_guidance_dims[0] > 0
            else None
        )
        self.decoder1 = Up(hidden_dim, decoder_dims[0], decoder_guidance_proj_dims[0])
        self.decoder2 = Up(decoder_dims[0], decoder_dims[1], decoder_guidance_proj_dims[1])
        self.head = nn.Conv2d(decoder_dims[1], 1, kernel_size=3, padding=1)

    @staticmethod
    def correlation(image: Tensor, text: Tensor) -> Tensor:
        """Cosine-similarity cost volume.

        Args:
            image: (B, C, H, W) dense image features.
            text: (B, T, P, C) text features.
        Returns:
            (B, P, T, H, W).
        """
        return torch.einsum("bchw,btpc->bpthw", F.normalize(image, dim=1), F.normalize(text, dim=-1))

    def forward(self, image: Tensor, text: Tensor, guidance: Sequence[Tensor]) -> Tensor:
        """Predict per-class logits.

        Args:
            image: (B, C, H, W) dense CLIP image features.
            text: (B, T, P, C) class text features.
            guidance: [appearance (B, Ca, H, W), decoder 1 (B, C4, 2H, 2W), decoder 2 (B, C5, 4H, 4W)].
        Returns:
            (B, T, 4H, 4W) logits.
        """
        num_classes = text.shape[1]
        corr = self.correlation(image, text)  # (B, P, T, H, W)
        kept = None
        if self.pad_len > 0 and num_classes > self.pad_len:
            # Keep the pad_len classes with the highest peak correlation (CAT-Seg's large-vocabulary path).
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
            text_guidance = self.text_guidance_projection(
                F.normalize(text.mean(dim=-2), dim=-1)
            )  # (B, T, Ct)

        for layer in self.layers:
            x = layer(x, appearance, text_guidance)

        y = rearrange(x, "b c t h w -> (b t) c h w")
        y = self.decoder1(y, decoder_guidance[0])
        y = self.decoder2(y, decoder_guidance[1])
        logits = rearrange(self.head(y), "(b t) 1 h w -> b t h w", b=batch)
        if kept is not None:
            out = logits.new_full((batch, num_classes, *logits.shape[-2:]), -100.0)
            logits = out.scatter(1, kept[..., None, None].expand(-1, -1, *logits.shape[-2:]), logits)
        return logits
