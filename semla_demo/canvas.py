"""Building blocks of the procedural scenes: Cityscapes ids, the camera, a z-buffered canvas and the
random helpers (textures, colours) that :mod:`semla_demo.scene` and :mod:`semla_demo.things` share.

The canvas keeps, per pixel, the nearest surface drawn so far: its distance, label, instance, colour,
how much it faces up and what it emits at night. Large surfaces are painted into it directly; objects
are queued as flat pixel lists (:meth:`Canvas.splat`) and resolved together (:meth:`Canvas.resolve`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Cityscapes train ids (``catseg/datasets/cs19.json``).
CLASS_NAMES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN = range(8)
VEGETATION, TERRAIN, SKY = range(8, 11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE = 255  # the ego car's bonnet (Cityscapes "ego vehicle", ignored in evaluation)

#: Distance given to sky pixels (metres); every surface is nearer.
SKY_DEPTH = 1000.0

TEXTURE = 32  # side of the random tables that texture surfaces in world coordinates
GAMMA = 2.2  # sRGB approximated by a pure power law: linear = srgb ** GAMMA


@dataclass(frozen=True)
class Camera:
    """A level pinhole camera on the ego car.

    Attributes:
        focal: focal length in pixels.
        cx: column of the principal point (the road's vanishing point), pixels.
        horizon: row of the principal point (the horizon), pixels.
        height: height of the camera above the road, metres.
        lateral: lateral position of the camera, metres from the road's centre line (+ = right).
    """

    focal: float
    cx: float
    horizon: float
    height: float
    lateral: float


@dataclass(frozen=True)
class Street:
    """Lateral layout of the street, metres from the road's centre line (symmetric unless stated).

    Attributes:
        road_half_width: kerb position; ``|u| < road_half_width`` is road.
        lanes_half_width: driving lanes lie in ``|u| < lanes_half_width``; beyond it, parking strips.
        lane_width: width of one driving lane.
        sidewalk: sidewalk widths (left, right).
        terrain: widths of the grass strips between sidewalk and buildings (left, right).
    """

    road_half_width: float
    lanes_half_width: float
    lane_width: float
    sidewalk: tuple[float, float]
    terrain: tuple[float, float]

    def building_line(self, side: int) -> float:
        """Distance of the facades from the centre line on ``side`` (0 = left, 1 = right)."""
        return self.road_half_width + self.sidewalk[side] + self.terrain[side]


# ----------------------------------------------------------------------------------------------------
# helpers


def value_noise(rng: np.random.Generator, size: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Smooth random field: a (cells + 1) grid of uniforms, bilinearly upsampled with smoothstep weights.

    Args:
        size: (H, W) of the output.
        cells: number of grid cells along (H, W); more cells = finer detail.
    Returns:
        (H, W) float64 in [0, 1].
    """
    (h, w), (ch, cw) = size, cells
    grid = rng.random((ch + 1, cw + 1))
    y = (np.arange(h) + 0.5) * ch / h
    x = (np.arange(w) + 0.5) * cw / w
    y0, x0 = np.minimum(y.astype(int), ch - 1), np.minimum(x.astype(int), cw - 1)
    fy, fx = y - y0, x - x0
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def lookup(table: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Piecewise-constant texture in world coordinates: ``table[floor(a) mod N, floor(b) mod N]``."""
    n = table.shape[0]
    return table[np.floor(a).astype(np.int64) % n, np.floor(b).astype(np.int64) % n]


def jitter(
    rng: np.random.Generator, rgb: tuple[float, float, float] | np.ndarray, amount: float
) -> np.ndarray:
    """(3,) colour scaled per channel by a factor in [1 - amount, 1 + amount], clipped to [0, 1]."""
    return np.minimum(
        np.maximum(np.asarray(rgb, dtype=np.float64) * rng.uniform(1 - amount, 1 + amount, 3), 0), 1
    )


def pick(rng: np.random.Generator, palette: np.ndarray, amount: float = 0.08) -> np.ndarray:
    """A jittered colour drawn from an (N, 3) palette."""
    return jitter(rng, palette[rng.integers(len(palette))], amount)


BUILDING_COLOURS = np.array(
    [
        (0.76, 0.70, 0.60),  # beige render
        (0.60, 0.34, 0.26),  # brick
        (0.55, 0.55, 0.57),  # concrete
        (0.84, 0.83, 0.79),  # white render
        (0.40, 0.39, 0.40),  # dark stone
        (0.70, 0.60, 0.44),  # sandstone
        (0.56, 0.62, 0.68),  # blue-grey panels
        (0.78, 0.64, 0.52),  # terracotta render
    ]
)
CAR_COLOURS = np.array(
    [
        (0.88, 0.88, 0.88),  # white
        (0.07, 0.07, 0.08),  # black
        (0.62, 0.63, 0.66),  # silver
        (0.32, 0.33, 0.35),  # grey
        (0.62, 0.08, 0.07),  # red
        (0.10, 0.20, 0.50),  # blue
        (0.14, 0.30, 0.20),  # green
        (0.85, 0.72, 0.15),  # yellow
    ]
)
CLOTHES = np.array(
    [
        (0.10, 0.10, 0.12),
        (0.20, 0.25, 0.45),
        (0.55, 0.12, 0.12),
        (0.80, 0.80, 0.78),
        (0.35, 0.30, 0.22),
        (0.15, 0.40, 0.30),
        (0.60, 0.50, 0.20),
        (0.45, 0.45, 0.48),
    ]
)
SKIN = np.array([(0.93, 0.76, 0.62), (0.80, 0.60, 0.45), (0.55, 0.38, 0.26), (0.36, 0.24, 0.16)])
GREENS = np.array([(0.22, 0.36, 0.12), (0.30, 0.42, 0.16), (0.16, 0.30, 0.14), (0.36, 0.44, 0.20)])
LAMP_LIGHT = np.array([(1.0, 0.62, 0.30), (0.95, 0.97, 1.0), (1.0, 0.85, 0.65)])  # sodium, LED, halogen


def categorical(rng: np.random.Generator, probs: Sequence[float], size: int | tuple[int, ...]) -> np.ndarray:
    """Integer draws in [0, len(probs)) with the given probabilities (faster than ``rng.choice`` with p)."""
    return np.searchsorted(np.cumsum(probs)[:-1], rng.random(size), side="right")


def thin(offset: np.ndarray, half: float | np.ndarray, pixel: np.ndarray) -> np.ndarray:
    """``|offset| < half``, widened to half a pixel (``pixel`` metres) so thin parts never vanish."""
    return np.abs(offset) < np.maximum(half, 0.5 * pixel)


def palette_colours(
    rng: np.random.Generator, palette: np.ndarray, n: int, amount: float = 0.08
) -> np.ndarray:
    """(n, 3) colours drawn from an (M, 3) palette, each channel jittered by up to ``amount``."""
    picked = palette[rng.integers(len(palette), size=n)] * rng.uniform(1 - amount, 1 + amount, (n, 3))
    return np.minimum(picked, 1.0)


def shade(
    rgb: np.ndarray, y: np.ndarray, top: np.ndarray, rng: np.random.Generator, noise: float
) -> np.ndarray:
    """(P, 3) colours lit from above (brighter towards the top), with a little per-pixel texture."""
    light = 0.82 + 0.18 * np.minimum(y / np.maximum(top, 1e-6), 1.0)
    grain = 1 + noise * rng.standard_normal(y.shape)
    return np.minimum(np.maximum(rgb * (light * grain)[:, None], 0), 1)


# ----------------------------------------------------------------------------------------------------
# z-buffered canvas


@dataclass
class Pixels:
    """The pixels inside the boxes of N objects, flattened into P entries.

    Attributes:
        obj: (P,) index of the object each pixel belongs to.
        pix: (P,) flat pixel index ``row * W + col``.
        x: (P,) lateral offset of the pixel centre from the object's axis, metres (clipped to the box).
        y: (P,) height of the pixel centre above the road, metres (clipped to the box).
        pixel: (P,) size of one pixel at the object's distance, metres.
    """

    obj: np.ndarray
    pix: np.ndarray
    x: np.ndarray
    y: np.ndarray
    pixel: np.ndarray


class Canvas:
    """Per-pixel buffers filled surface by surface; a surface wins a pixel where it is nearer (z-test)."""

    def __init__(self, size: tuple[int, int], camera: Camera) -> None:
        h, w = size
        self.h, self.w, self.cam = h, w, camera
        self.rgb = np.zeros((h, w, 3))
        self.z = np.full((h, w), SKY_DEPTH)
        self.label = np.full((h, w), SKY, dtype=np.uint8)
        self.inst = np.zeros((h, w), dtype=np.int32)
        self.up = np.zeros((h, w))
        self.emit = np.zeros((h, w, 3))
        self.sun = np.ones((h, w, 3))
        self.inst_classes: list[int] = [IGNORE]
        self._queue: list[tuple[np.ndarray, ...]] = []
        self.ys = (np.arange(h) + 0.5)[:, None]  # (H, 1) pixel-centre rows
        self.xs = (np.arange(w) + 0.5)[None, :]  # (1, W) pixel-centre columns

    def paint(
        self,
        rs: slice,
        cs: slice,
        mask: np.ndarray,
        z: float | np.ndarray,
        cls: int | np.ndarray,
        rgb: np.ndarray,
        *,
        inst: int = 0,
        up: float | np.ndarray = 0.0,
        emit: np.ndarray | None = None,
        sun: float | np.ndarray = 1.0,
    ) -> None:
        """Draw a surface into the window ``[rs, cs]`` where ``mask`` holds and it is nearer.

        Args:
            mask: (h, w) bool (broadcastable) footprint of the surface in the window.
            z: forward distance of the surface, scalar or (h, w).
            cls: train id, scalar or (h, w).
            rgb: (3,) or (h, w, 3) sRGB colour in [0, 1].
            inst: instance id (0 = not a countable object).
            up: upward-facing fraction, scalar or (h, w).
            emit: (3,) or (h, w, 3) night emission (linear), or None for none.
            sun: scalar, (3,) or (h, w, 3) linear factor of direct sunlight in ``rgb`` (1 = sunlit,
                < 1 in shade), divided out under overcast skies and at night.
        """
        zbuf = self.z[rs, cs]  # basic slices are views: copyto below writes into the buffers
        win = mask & (z < zbuf)
        if not win.any():
            return
        win3 = win[..., None]
        np.copyto(zbuf, z, where=win)
        np.copyto(self.label[rs, cs], cls, where=win, casting="unsafe")
        np.copyto(self.inst[rs, cs], inst, where=win, casting="unsafe")
        np.copyto(self.rgb[rs, cs], rgb, where=win3)
        np.copyto(self.up[rs, cs], up, where=win)
        np.copyto(self.emit[rs, cs], 0.0 if emit is None else emit, where=win3)
        np.copyto(self.sun[rs, cs], sun, where=win3)

    def boxes(
        self,
        u: np.ndarray,
        z: np.ndarray,
        left: np.ndarray | float,
        right: np.ndarray | float,
        bottom: np.ndarray | float,
        top: np.ndarray | float,
    ) -> Pixels:
        """The pixels of N upright rectangles ``u + left <= lateral <= u + right``, ``bottom <= height <=
        top`` at forward distances ``z``, all flattened into one list.

        A rectangle thinner or lower than a pixel keeps one pixel in that direction, so that poles never
        vanish; rectangles nearer than 0.5 m are dropped.

        Args:
            u, z: (N,) lateral position of each object's axis and its distance, metres.
            left, right, bottom, top: scalars or (N,) extents, metres (left/right relative to ``u``).
        """
        cam = self.cam
        u = np.asarray(u, dtype=np.float64)
        n_obj = u.shape[0]
        z, left, right, bottom, top = (
            np.full(n_obj, a, dtype=np.float64) if np.ndim(a) == 0 else np.asarray(a, dtype=np.float64)
            for a in (z, left, right, bottom, top)
        )
        k = cam.focal / np.maximum(z, 0.5)  # pixels per metre at each object's distance
        xl, xr = cam.cx + (u + left - cam.lateral) * k, cam.cx + (u + right - cam.lateral) * k
        yt, yb = cam.horizon + (cam.height - top) * k, cam.horizon + (cam.height - bottom) * k
        c0, c1 = np.ceil(xl - 0.5), np.ceil(xr - 0.5)
        narrow = c1 <= c0
        c0 = np.where(narrow, np.floor(0.5 * (xl + xr)), c0)
        c1 = np.where(narrow, c0 + 1, c1)
        r0, r1 = np.ceil(yt - 0.5), np.ceil(yb - 0.5)
        low = r1 <= r0
        r0 = np.where(low, np.floor(0.5 * (yt + yb)), r0)
        r1 = np.where(low, r0 + 1, r1)
        c0, c1 = (np.minimum(np.maximum(a, 0), self.w).astype(np.int64) for a in (c0, c1))
        r0, r1 = (np.minimum(np.maximum(a, 0), self.h).astype(np.int64) for a in (r0, r1))
        width = np.where(z >= 0.5, np.maximum(c1 - c0, 0), 0)
        count = width * np.maximum(r1 - r0, 0)
        obj = np.repeat(np.arange(n_obj), count)
        offset = np.arange(obj.size) - (np.cumsum(count) - count)[obj]
        col = c0[obj] + offset % np.maximum(width[obj], 1)
        row = r0[obj] + offset // np.maximum(width[obj], 1)
        ko = k[obj]
        x = np.minimum(np.maximum((col + 0.5 - cam.cx) / ko + cam.lateral - u[obj], left[obj]), right[obj])
        y = np.minimum(np.maximum(cam.height - (row + 0.5 - cam.horizon) / ko, bottom[obj]), top[obj])
        return Pixels(obj=obj, pix=row * self.w + col, x=x, y=y, pixel=1.0 / ko)

    def splat(
        self,
        px: Pixels,
        mask: np.ndarray,
        z: np.ndarray,
        cls: np.ndarray | int,
        rgb: np.ndarray,
        inst: np.ndarray | int,
        up: np.ndarray | float = 0.0,
        emit: np.ndarray | None = None,
    ) -> None:
        """Queue object pixels (all (P,) or (P, 3), selected by ``mask``); :meth:`resolve` draws them."""
        keep = np.flatnonzero(mask)

        def select(a: np.ndarray | float, channels: bool = False) -> np.ndarray:
            if np.ndim(a) == (1 if channels else 0):  # one value for every pixel
                return np.tile(np.asarray(a, dtype=np.float64), (keep.size, 1) if channels else keep.size)
            return np.asarray(a)[keep]

        self._queue.append(
            (
                px.pix[keep],
                select(z),
                select(cls),
                select(rgb, True),
                select(inst),
                select(up),
                np.zeros((keep.size, 3)) if emit is None else select(emit, True),
            )
        )

    def resolve(self) -> None:
        """Draw the queued object pixels: per pixel the nearest one, where it is nearer than the stuff."""
        if not self._queue:
            return
        pix, z, cls, rgb, inst, up, emit = (np.concatenate(parts) for parts in zip(*self._queue))
        self._queue.clear()
        zflat = self.z.reshape(-1)
        keep = np.flatnonzero(z < zflat[pix])
        order = keep[np.lexsort((z[keep], pix[keep]))]  # by pixel, nearest first
        first = np.ones(order.size, dtype=bool)
        first[1:] = pix[order[1:]] != pix[order[:-1]]
        win = order[first]
        p = pix[win]
        zflat[p] = z[win]
        self.label.reshape(-1)[p] = cls[win]
        self.inst.reshape(-1)[p] = inst[win]
        self.rgb.reshape(-1, 3)[p] = rgb[win]
        self.up.reshape(-1)[p] = up[win]
        self.emit.reshape(-1, 3)[p] = emit[win]
        self.sun.reshape(-1, 3)[p] = 1.0

    def new_instances(self, classes: np.ndarray) -> np.ndarray:
        """Register len(classes) objects; returns their (N,) instance ids."""
        start = len(self.inst_classes)
        self.inst_classes.extend(int(c) for c in np.asarray(classes).ravel())
        return np.arange(start, len(self.inst_classes))
