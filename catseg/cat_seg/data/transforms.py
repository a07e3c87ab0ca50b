"""Geometric and photometric transforms of the CAT-Seg data pipeline, as pure numpy/torch functions.

They reproduce the detectron2 behaviour the original relies on (sizes, interpolation, sampling order)
without detectron2 or OpenCV. All randomness comes from a ``numpy.random.Generator`` argument.

Conventions: images are (H, W, 3) uint8 arrays, labels (H, W) integer arrays, sizes are (height, width)
unless a name says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Box = tuple[int, int, int, int]
"""Crop box (y0, x0, height, width)."""


# ----------------------------------------------------------------------------------------------------
# resizing


def shortest_edge_size(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Output size of detectron2's ``ResizeShortestEdge`` (``get_output_shape``).

    The short side becomes ``short_edge``; if the long side then exceeds ``max_size`` both are scaled
    down so that the long side equals ``max_size``; each side is finally rounded with ``int(x + 0.5)``.
    ``short_edge == 0`` means "no resize". Example: (1080, 1920), 640, 2560 -> (640, 1138).

    Args:
        height, width: input size.
        short_edge: target length of the shorter side (0 = unchanged).
        max_size: cap on the longer side.
    Returns:
        (new_height, new_width).
    """
    if short_edge == 0:
        return height, width
    scale = short_edge / min(height, width)
    if height < width:
        new_h, new_w = float(short_edge), scale * width
    else:
        new_h, new_w = scale * height, float(short_edge)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 image with PIL, as detectron2's ``ResizeTransform`` does for uint8.

    Args:
        image: (H, W, 3) uint8.
        size: (new_height, new_width).
    Returns:
        (new_height, new_width, 3) uint8.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"resize_image expects uint8, got {image.dtype}")
    if image.shape[:2] == tuple(size):
        return image
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(resized)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize of a label map the way detectron2 resizes the (float) labels of its train mapper:
    ``torch.nn.functional.interpolate(mode="nearest")``, i.e. source index ``floor(dst * in / out)``.

    Args:
        label: (H, W) integer map.
        size: (new_height, new_width).
    Returns:
        (new_height, new_width) int64.
    """
    if label.shape == tuple(size):
        return label.astype(np.int64, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float64))[None, None]
    return F.interpolate(t, size=tuple(size), mode="nearest")[0, 0].numpy().astype(np.int64)


def resize_nearest_exact(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV ``INTER_NEAREST_EXACT`` resize (source index ``floor((dst + 0.5) * in / out)``).

    Used by the Cityscapes (cs-normal) mappers on image and label, and to bring predictions back to the
    original resolution for evaluation.

    Args:
        array: (H, W) or (H, W, C), any numeric dtype.
        size: (new_height, new_width).
    Returns:
        array of shape (new_height, new_width[, C]) and the input dtype.
    """
    if array.shape[:2] == tuple(size):
        return array
    rows = _exact_indices(array.shape[0], size[0])
    cols = _exact_indices(array.shape[1], size[1])
    return array[rows][:, cols]


def _exact_indices(n_in: int, n_out: int) -> np.ndarray:
    # floor((i + 0.5) * n_in / n_out) in exact integer arithmetic: floor((2i + 1) * n_in / (2 n_out)).
    i = np.arange(n_out, dtype=np.int64)
    return np.minimum(((2 * i + 1) * n_in) // (2 * n_out), n_in - 1)


# ----------------------------------------------------------------------------------------------------
# cropping, flipping, padding


def sample_crop(
    label: np.ndarray,
    crop_size: tuple[int, int],
    single_category_max_area: float,
    ignore_label: int | None,
    rng: np.random.Generator,
    *,
    max_tries: int = 10,
) -> Box:
    """detectron2's ``RandomCrop_CategoryAreaConstraint`` with an absolute crop size.

    The crop is ``(min(crop_h, H), min(crop_w, W))``. With ``single_category_max_area >= 1`` the first
    uniformly drawn position is used. Otherwise up to ``max_tries`` positions are drawn until the crop
    holds more than one non-ignore category and the largest one covers strictly less than
    ``single_category_max_area`` of the non-ignore pixels; after ``max_tries`` failures the last draw is
    kept (as detectron2).

    Args:
        label: (H, W) label map of the (resized) image.
        crop_size: (crop_height, crop_width).
        single_category_max_area: maximum area ratio of one category, in (0, 1].
        ignore_label: id not counted as a category, or None.
        rng: source of randomness (y0 is drawn before x0, as detectron2).
    Returns:
        (y0, x0, height, width).
    """
    h, w = label.shape[:2]
    ch, cw = min(crop_size[0], h), min(crop_size[1], w)
    y0 = x0 = 0
    for _ in range(max_tries if single_category_max_area < 1.0 else 1):
        y0 = int(rng.integers(h - ch + 1))
        x0 = int(rng.integers(w - cw + 1))
        if single_category_max_area >= 1.0:
            break
        ids, counts = np.unique(label[y0 : y0 + ch, x0 : x0 + cw], return_counts=True)
        if ignore_label is not None:
            counts = counts[ids != ignore_label]
        if len(counts) > 1 and counts.max() < counts.sum() * single_category_max_area:
            break
    return y0, x0, ch, cw


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """``array[y0:y0+h, x0:x0+w]`` for a (y0, x0, h, w) box."""
    y0, x0, h, w = box
    return array[y0 : y0 + h, x0 : x0 + w]


def hflip(array: np.ndarray) -> np.ndarray:
    """Horizontal flip of an (H, W[, C]) array."""
    return np.ascontiguousarray(array[:, ::-1])


def padded_size(height: int, width: int, size_divisibility: int) -> tuple[int, int]:
    """Size after right/bottom padding: each side rounded up to a multiple of ``size_divisibility``.

    For inputs no larger than ``size_divisibility`` (always the case after the 384 crop) this is exactly
    ``size_divisibility``, which is what the original pads to.
    """
    if size_divisibility <= 0:
        return height, width
    return (
        math.ceil(height / size_divisibility) * size_divisibility,
        math.ceil(width / size_divisibility) * size_divisibility,
    )


def pad_bottom_right(array: np.ndarray, size: tuple[int, int], value: int) -> np.ndarray:
    """Pad an (H, W[, C]) array on the right and bottom to ``size`` with a constant ``value``."""
    h, w = array.shape[:2]
    if (h, w) == tuple(size):
        return array
    if size[0] < h or size[1] < w:
        raise ValueError(f"cannot pad {(h, w)} to smaller size {tuple(size)}")
    pad = [(0, size[0] - h), (0, size[1] - w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="constant", constant_values=value)


# ----------------------------------------------------------------------------------------------------
# SSD colour augmentation


def rgb_to_hsv_u8(image: np.ndarray) -> np.ndarray:
    """RGB uint8 -> HSV uint8 with OpenCV's 8-bit convention (H in [0, 180), S and V in [0, 255]).

    Args:
        image: (H, W, 3) uint8 RGB.
    Returns:
        (H, W, 3) uint8 HSV.
    """
    rgb = image.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    diff = v - rgb.min(axis=-1)
    safe_v = np.where(v > 0, v, 1.0)
    safe_d = np.where(diff > 0, diff, 1.0)
    s = np.where(v > 0, diff * 255.0 / safe_v, 0.0)
    h = np.where(v == r, (g - b) / safe_d, np.where(v == g, 2.0 + (b - r) / safe_d, 4.0 + (r - g) / safe_d))
    h = np.where(diff > 0, h * 30.0, 0.0)  # sextant units * 60 degrees / 2 (OpenCV halves hue for 8-bit)
    h = np.where(h < 0, h + 180.0, h)
    h = np.rint(h) % 180
    return np.stack([h, np.rint(s), v], axis=-1).astype(np.uint8)


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
    """HSV uint8 (OpenCV 8-bit convention) -> RGB uint8 (rounded, as OpenCV's ``saturate_cast``).

    Args:
        hsv: (H, W, 3) uint8 with H in [0, 180).
    Returns:
        (H, W, 3) uint8 RGB.
    """
    h = hsv[..., 0].astype(np.float64) * (6.0 / 180.0)
    s = hsv[..., 1].astype(np.float64) / 255.0
    v = hsv[..., 2].astype(np.float64) / 255.0
    sector = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [
            np.stack([v, t, p], -1),
            np.stack([q, v, p], -1),
            np.stack([p, v, t], -1),
            np.stack([p, q, v], -1),
            np.stack([t, p, v], -1),
            np.stack([v, p, q], -1),
        ],
        axis=0,
    )  # (6, H, W, 3)
    rgb = np.take_along_axis(table, sector[None, ..., None], axis=0)[0]
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # float32 affine map, clipped to [0, 255] and truncated to uint8 (the SSD recipe's ``convert``).
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def color_aug_ssd(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    image_format: Literal["RGB", "BGR"] = "RGB",
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """SSD photometric distortion as in detectron2's ``ColorAugSSDTransform``.

    Order: brightness (p=0.5, additive delta in [-32, 32]); then, with equal odds, either
    contrast -> saturation -> hue or saturation -> hue -> contrast; each of the three is applied with
    p=0.5 (contrast: factor in [0.5, 1.5]; saturation: S channel factor in [0.5, 1.5]; hue: integer shift
    in [-18, 18] of OpenCV's 0-179 hue, modulo 180). Every step truncates to uint8. The draws come from
    ``rng`` in the order detectron2 draws them from Python's ``random``. The numpy HSV conversions follow
    OpenCV's 8-bit convention and agree with ``cv2.cvtColor`` to within 1 per channel.

    Args:
        image: (H, W, 3) uint8 in ``image_format`` channel order.
        rng: source of randomness.
    Returns:
        (H, W, 3) uint8, same channel order.
    """
    img = image[..., ::-1] if image_format == "BGR" else image  # work in RGB; HSV does not depend on it

    def contrast(x: np.ndarray) -> np.ndarray:
        return _convert(x, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else x

    def saturation(x: np.ndarray) -> np.ndarray:
        if not rng.integers(2):
            return x
        hsv = rgb_to_hsv_u8(x)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        return hsv_to_rgb_u8(hsv)

    def hue(x: np.ndarray) -> np.ndarray:
        if not rng.integers(2):
            return x
        hsv = rgb_to_hsv_u8(x)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta + 1))) % 180
        return hsv_to_rgb_u8(hsv)

    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    if rng.integers(2):
        img = hue(saturation(contrast(img)))
    else:
        img = contrast(hue(saturation(img)))
    img = img[..., ::-1] if image_format == "BGR" else img
    return np.ascontiguousarray(img)


def choose_short_edge(
    min_sizes: Sequence[int], sampling: Literal["choice", "range"], rng: np.random.Generator
) -> int:
    """Short-edge length for training: one of ``min_sizes`` ("choice") or an integer in
    ``[min_sizes[0], min_sizes[1]]`` ("range"), as detectron2's ``ResizeShortestEdge``."""
    if sampling == "choice":
        return int(min_sizes[int(rng.integers(len(min_sizes)))])
    if sampling == "range":
        if len(min_sizes) != 2:
            raise ValueError(f"'range' sampling needs two sizes, got {list(min_sizes)}")
        return int(rng.integers(min_sizes[0], min_sizes[1] + 1))
    raise ValueError(f"sampling must be 'choice' or 'range', got {sampling!r}")
