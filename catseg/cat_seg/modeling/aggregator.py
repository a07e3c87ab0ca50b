"""CAT-Seg cost aggregation: cost volume, spatial (swin) and class (linear attention) aggregation, decoder.

Shape letters: B batch (views), C channels, T classes, P prompt templates, H x W the CLIP token grid,
L = H * W positions.
Parameter names follow the released CAT-Seg checkpoints (``layers.N.swin_block.block_1.attn.q``, ...),
because SemLA's adapters address these modules by name.

The computation is CAT-Seg's, organised for speed without changing its result:

- the class attention does not materialise its padding (see :class:`ClassTransformerLayer`);
- guidance shared by the classes of an image is broadcast, never repeated per class;
- the cost embedding travels between the spatial and the class stages as (B, T, H, W, C)-contiguous
  tokens, the layout both of them read, so no transposing copy sits between them;
- the stages whose rows are independent (spatial blocks: per class; class attention: per position;
  decoder: per class map) run on chunks of about :data:`CHUNK_ROWS` rows, so that their temporaries stay
  small. Chunks always hold every image of the batch, because per-image fused LoRA adapters split a
  layer's input into images along its leading axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

#: Rows (positions x classes x images) a chunked stage processes at once. On CPU, large temporaries cost
#: more than their arithmetic (fresh pages, cache misses): ~6k rows of width 128-512 keep them in the
#: caches and in memory the allocator reuses, and still make efficient matrix products.
CHUNK_ROWS = 6144


def chunks(total: int, step: int) -> list[slice]:
    """Consecutive slices of ``range(total)``, ``step`` long (the last may be shorter)."""
    step = max(int(step), 1)
    return [slice(start, min(start + step, total)) for start in range(0, total, step)]


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


def window_order(height: int, width: int, window: int, shift: int) -> Tensor:
    """Where each token of the cyclically shifted, window-partitioned grid comes from.

    ``x[..., window_order(...), :]`` on row-major (H*W) tokens equals Swin's
    ``window_partition(torch.roll(x, (-shift, -shift)), window)`` with the windows laid end to end, in
    one gather instead of two copies.

    Returns:
        (H*W,) int64 row-major source index of each token, windows outermost, on the CPU (computed there even
        under a ``meta`` default device, where ``torch.roll`` would import ``torch._dynamo``).
    """
    grid = torch.arange(height * width, device="cpu").reshape(1, height, width, 1)
    if shift:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(grid, window).reshape(-1)


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

    def forward(self, x: Tensor, num_windows: int, mask: Tensor | None = None) -> Tensor:
        """Attention inside windows laid end to end along the token axis.

        Args:
            x: (B, nW * N, dim + guidance_dim) tokens in window order with guidance concatenated.
            num_windows: nW.
            mask: (nW, N, N) additive mask or None.
        Returns:
            (B, nW * N, dim).
        """
        batch, length, _ = x.shape
        win = length // num_windows
        # The projections are module calls on every row at once: LoRA and fused adapters act on them.
        q, k = (
            rearrange(f(x), "b (w n) (h d) -> b w h n d", w=num_windows, h=self.heads)
            for f in (self.q, self.k)
        )
        v = rearrange(self.v(x[..., : self.dim]), "b (w n) (h d) -> b w h n d", w=num_windows, h=self.heads)
        out = x.new_empty(batch, num_windows, win, self.heads, self.dim // self.heads)
        # One call per window on strided views: the mask differs between windows but not between
        # images, so it broadcasts over the batch instead of being copied for every (image, window).
        for w in range(num_windows):
            attn_mask = mask[w].to(q.dtype) if mask is not None else None
            o = F.scaled_dot_product_attention(
                q[:, w], k[:, w], v[:, w], attn_mask=attn_mask, scale=self.scale
            )
            out[:, w] = o.transpose(1, 2)
        return self.proj(rearrange(out, "b w n h d -> b (w n) (h d)"))


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
        order = window_order(*self.resolution, self.window, self.shift)
        device = torch.get_default_device()
        # Not in the state dict: derived from the geometry, and the checkpoints do not have them.
        self.register_buffer("order", order.to(device), persistent=False)
        self.register_buffer("inverse_order", torch.argsort(order).to(device), persistent=False)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, guidance_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4)

    @property
    def num_windows(self) -> int:
        return (self.resolution[0] // self.window) * (self.resolution[1] // self.window)

    def forward(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        """Args:
            x: (B, T, H*W, dim) tokens of every class of every image, row-major.
            guidance: (B, H*W, guidance_dim) normalised appearance guidance, shared by the T classes, or None.
        Returns:
            (B, T, H*W, dim).
        """
        batch, classes, length, _ = x.shape
        # Work in (shifted) window order: one gather replaces roll + partition, one gather at the end
        # replaces merge + roll; everything but the attention is per token and does not mind the order.
        x = x.index_select(2, self.order)
        y = self.norm1(x)
        if guidance is not None:
            g = guidance.index_select(1, self.order)  # (B, H*W, Cg): per image, not per class
            y = torch.cat([y, g[:, None].expand(batch, classes, length, g.shape[-1])], dim=-1)
        y = self.attn(y.flatten(0, 1), self.num_windows, mask=self.attn_mask)  # (B*T, H*W, dim)
        x = x + y.view_as(x)
        x = x + self.mlp(self.norm2(x))
        return x.index_select(2, self.inverse_order)


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
            x: (B, C, T, H, W) cost embedding; any memory layout, (B, T, H, W, C)-contiguous needs no copy.
            guidance: (B, Cg, H, W) projected appearance guidance, or None.
        Returns:
            (B, C, T, H, W), (B, T, H, W, C)-contiguous.
        """
        batch, _, classes, height, width = x.shape
        x = rearrange(x, "b c t h w -> b t (h w) c")
        if guidance is not None and self.guidance_norm is not None:
            # Normalised once per image; the classes share it by broadcasting.
            guidance = self.guidance_norm(rearrange(guidance, "b c h w -> b (h w) c"))
        else:
            guidance = None
        # Each class is its own sequence here: chunks of classes (with every image) are independent.
        outs = [
            self.block_2(self.block_1(x[:, part], guidance), guidance)
            for part in chunks(classes, CHUNK_ROWS // (batch * height * width))
        ]
        x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return rearrange(x, "b t (h w) c -> b c t h w", h=height)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pad_k: Tensor | None = None,
    pad_v: Tensor | None = None,
    multiplicity: int = 0,
    eps: float = 1e-6,
) -> Tensor:
    """Linear attention with the elu + 1 feature map (Katharopoulos et al. 2020, as used by CAT-Seg).

    The sequence (the classes) is axis 1; N and L (positions) are batch axes. An optional padding
    key/value pair stands for ``multiplicity`` identical keys and values appended to the sequence: it
    enters the key sum and the key-value sum that many times, which is what the padded sequence computes.
    Values are divided by the sequence length and the result multiplied back (an fp16 overflow guard of
    the original).

    Args:
        q: (N, S, L, H, D) queries.
        k: (N, S, L, H, D) keys.
        v: (N, S, L, H, E) values.
        pad_k: (N, H, D) padding key, shared by the L positions, or None.
        pad_v: (N, H, E) padding value, or None.
        multiplicity: m, how many copies of the padding key/value the sequence holds.
    Returns:
        (N, S, L, H, E).
    """
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    length = v.shape[1] + multiplicity
    v = v / length
    kv = torch.einsum("nslhd,nslhe->nlhde", k, v)
    k_sum = k.sum(dim=1)  # (N, L, H, D)
    if multiplicity and pad_k is not None and pad_v is not None:
        pad_k = F.elu(pad_k) + 1
        kv = kv + (multiplicity * torch.einsum("nhd,nhe->nhde", pad_k, pad_v / length))[:, None]
        k_sum = k_sum + multiplicity * pad_k[:, None]
    z = 1 / (torch.einsum("nslhd,nlhd->nslh", q, k_sum) + eps)
    return torch.einsum("nslhd,nlhde->nslhe", q, kv) * (z * length)[..., None]


def full_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pad_k: Tensor | None = None,
    pad_v: Tensor | None = None,
    multiplicity: int = 0,
) -> Tensor:
    """Softmax attention along dim 1, with an optional padding key/value of multiplicity m.

    m identical keys contribute m * exp(q.k_pad) to the softmax, so the padding is one extra key whose
    logit is raised by log m.

    Args:
        q, k: (N, S, L, H, D); v: (N, S, L, H, E).
        pad_k: (N, H, D), pad_v: (N, H, E) or None.
        multiplicity: m.
    Returns:
        (N, S, L, H, E).
    """
    n, s, length = q.shape[:3]
    q4, k4, v4 = (rearrange(t, "n s l h d -> (n l) h s d") for t in (q, k, v))
    bias = None
    if multiplicity and pad_k is not None and pad_v is not None:
        k4 = torch.cat([k4, repeat(pad_k, "n h d -> (n l) h 1 d", l=length)], dim=2)
        v4 = torch.cat([v4, repeat(pad_v, "n h e -> (n l) h 1 e", l=length)], dim=2)
        bias = q.new_zeros(1, s + 1)  # (queries, keys), broadcast over queries
        bias[:, -1] = math.log(multiplicity)
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias)
    return rearrange(out, "(n l) h s e -> n s l h e", n=n)


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

    def padding_key_value(self, token: Tensor, guidance: Tensor | None) -> tuple[Tensor, Tensor]:
        """Key and value of the padding class.

        Args:
            token: (B, 1, dim) normalised padding token, one row per image (not one shared row), so
                that per-image fused adapters apply to it as to the image's other rows.
            guidance: (B, 1, guidance_dim) padding guidance, or None.
        Returns:
            key (B, heads, D) and value (B, heads, D).
        """
        k_in = torch.cat([token, guidance], dim=-1) if guidance is not None else token
        key = rearrange(self.k(k_in), "b 1 (h d) -> b h d", h=self.heads)
        value = rearrange(self.v(token), "b 1 (h d) -> b h d", h=self.heads)
        return key, value

    def forward(
        self,
        x: Tensor,
        guidance: Tensor | None,
        padding: tuple[Tensor, Tensor] | None = None,
        multiplicity: int = 0,
    ) -> Tensor:
        """Attention across classes at every position.

        Args:
            x: (B, T, L, dim) normalised tokens of T classes at L positions.
            guidance: (B, T, guidance_dim) text guidance, shared by the L positions, or None.
            padding: key and value of a padding class (:meth:`padding_key_value`) that stands for
                ``multiplicity`` identical classes after the T real ones; it serves as key and value
                only (its own outputs are discarded by CAT-Seg).
            multiplicity: m >= 0.
        Returns:
            (B, T, L, dim), the real classes' outputs.
        """
        batch, classes, length, _ = x.shape
        if guidance is not None:
            qk_in = torch.cat([x, guidance[:, :, None].expand(batch, classes, length, -1)], dim=-1)
        else:
            qk_in = x
        q, k = (rearrange(f(qk_in), "b t l (h d) -> b t l h d", h=self.heads) for f in (self.q, self.k))
        v = rearrange(self.v(x), "b t l (h d) -> b t l h d", h=self.heads)
        pad_k, pad_v = padding if padding is not None and multiplicity > 0 else (None, None)
        attend = linear_attention if self.attention_type == "linear" else full_attention
        out = attend(q, k, v, pad_k=pad_k, pad_v=pad_v, multiplicity=multiplicity)
        return rearrange(out, "b t l h d -> b t l (h d)")


class ClassTransformerLayer(nn.Module):
    """Attention across classes at every (pooled) spatial position.

    CAT-Seg pads the class axis to ``pad_len`` with copies of a learnt token (and of a learnt guidance);
    the padding takes part in the attention and is dropped afterwards. The copies are identical, so
    this layer computes the same result from the T real classes plus one padding class counted
    m = ``pad_len - T`` times as key and value (exact; see :func:`linear_attention` and
    :func:`full_attention`). The padding's own outputs (attention, MLP, residual) are discarded by
    CAT-Seg and are not computed.
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
            x: (B, C, T, H, W); any memory layout, (B, T, H, W, C)-contiguous needs no copy.
            guidance: (B, T, Cg) projected text guidance, or None.
        Returns:
            (B, C, T, H, W), in the memory layout of ``x``.
        """
        batch, _, classes, height, width = x.shape
        pooled = self.pooling_size != (1, 1)
        if pooled:
            y = F.avg_pool2d(rearrange(x, "b c t h w -> (b t) c h w"), self.pooling_size)
            ph = y.shape[-2]
            tokens = rearrange(y, "(b t) c h w -> b t (h w) c", b=batch)
        else:
            ph = height
            tokens = rearrange(x, "b c t h w -> b t (h w) c")
        # With more classes than pad_len (only when called outside the aggregator), nothing is padded.
        multiplicity = max(self.pad_len - classes, 0) if self.padding_tokens is not None else 0
        padding = None
        if multiplicity > 0:
            pad_guidance = None
            if guidance is not None and self.padding_guidance is not None:
                pad_guidance = self.padding_guidance.expand(batch, 1, -1)
            token = self.norm1(self.padding_tokens).expand(batch, 1, -1)
            padding = self.attention.padding_key_value(token, pad_guidance)
        # Positions are independent here: chunks of positions (with every class and image).
        outs = []
        for part in chunks(tokens.shape[2], CHUNK_ROWS // (batch * classes)):
            t = tokens[:, :, part]
            t = t + self.attention(self.norm1(t), guidance, padding, multiplicity)
            outs.append(t + self.MLP(self.norm2(t)))
        tokens = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, T, L', C)
        if pooled:
            out = F.interpolate(
                rearrange(tokens, "b t (h w) c -> (b t) c h w", h=ph),
                size=(height, width),
                mode="bilinear",
                align_corners=True,
            )
            return x + rearrange(out, "(b t) c h w -> b c t h w", b=batch)
        # As CAT-Seg: the layer's output is added to its input, which the attention residual holds too.
        return x + rearrange(tokens, "b t (h w) c -> b c t h w", h=height)


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


def upsample_2x(up: nn.ConvTranspose2d, x: Tensor) -> Tensor:
    """A kernel-2, stride-2 transposed convolution as one matrix product.

    Each input pixel writes its own 2 x 2 output block (no overlap), so the transposed convolution is
    ``x @ W`` per pixel followed by a pixel shuffle; computed in channels-last order, which the following
    convolutions read without a copy.

    Args:
        up: the ``ConvTranspose2d(C, C', kernel_size=2, stride=2)`` whose weights to use.
        x: (N, C, H, W), any memory layout.
    Returns:
        (N, C', 2H, 2W), channels-last.
    """
    if up.kernel_size != (2, 2) or up.stride != (2, 2) or up.padding != (0, 0) or up.groups != 1:
        return up(x)
    weight = rearrange(up.weight, "c o i j -> c (i j o)")
    bias = repeat(up.bias, "o -> (ij o)", ij=4) if up.bias is not None else None
    y = F.linear(rearrange(x, "n c h w -> n h w c"), weight.T, bias)  # (N, H, W, 4 C')
    y = rearrange(y, "n h w (i j o) -> n (h i) (w j) o", i=2, j=2)
    return rearrange(y, "n h w o -> n o h w")


class Up(nn.Module):
    """2x transposed-conv upsampling, concatenation with guidance, then :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def guidance_features(self, guidance: Tensor) -> Tensor:
        """The guidance's part of the first convolution, computed once per image.

        That convolution (no bias) of ``[upsampled x, guidance]`` is the sum of a convolution of each;
        the classes of an image share the guidance, so its part is computed once and broadcast.

        Args:
            guidance: (B, Cg, 2H, 2W).
        Returns:
            (B, out_channels, 2H, 2W).
        """
        conv = self.conv.double_conv[0]
        return F.conv2d(guidance, conv.weight[:, self.up.out_channels :], padding=conv.padding)

    def forward(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        """Args:
            x: (N, C, H, W) class maps.
            guidance: features from :meth:`guidance_features` broadcastable to (N, out_channels, 2H, 2W)
                (e.g. (1, ...) for maps of one image), or None.
        Returns:
            (N, out_channels, 2H, 2W).
        """
        x = upsample_2x(self.up, x)
        conv, rest = self.conv.double_conv[0], self.conv.double_conv[1:]
        if guidance is None:
            return rest(conv(x))
        y = F.conv2d(x, conv.weight[:, : self.up.out_channels], padding=conv.padding) + guidance
        return rest(y)


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

    def decode(self, x: Tensor, guidance: Sequence[Tensor | None]) -> Tensor:
        """The decoder, applied to every class map independently.

        Args:
            x: (B, C, T, H, W) aggregated cost embedding.
            guidance: projected decoder guidance [(B, C1, 2H, 2W), (B, C2, 4H, 4W)] (or None each).
        Returns:
            (B, T, 4H, 4W) logits.
        """
        batch, channels, classes, height, width = x.shape
        first, second = (
            up.guidance_features(g) if g is not None else None
            for up, g in zip((self.decoder1, self.decoder2), guidance)
        )
        maps = rearrange(x, "b c t h w -> b t c h w")
        # Class maps are independent and the decoder holds no adapter targets: chunks of a few maps of one
        # image, whose last activations (4H x 4W x C2 per map) hold about as many numbers as a chunk of the
        # other stages (CHUNK_ROWS x C).
        step = CHUNK_ROWS * channels // (16 * height * width * self.head.in_channels)
        views = []
        for b in range(batch):
            g1 = first[b : b + 1] if first is not None else None
            g2 = second[b : b + 1] if second is not None else None
            parts = [
                self.head(self.decoder2(self.decoder1(maps[b, part], g1), g2))[:, 0]
                for part in chunks(classes, step)
            ]
            views.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return torch.stack(views)

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

        logits = self.decode(x, decoder_guidance)
        if kept is not None:
            out = logits.new_full((batch, num_classes, *logits.shape[-2:]), -100.0)
            logits = out.scatter(1, kept[..., None, None].expand(-1, -1, *logits.shape[-2:]), logits)
        return logits
