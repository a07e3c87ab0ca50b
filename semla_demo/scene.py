"""Procedural street scenes seen from a car: geometry, Cityscapes labels, depth and clear-day colours.

A scene is built in metres and projected through a level pinhole camera whose principal point sits on
the horizon, so that a point at lateral position ``u``, height ``Y`` and forward distance ``z`` lands at
column ``cx + f (u - u_cam) / z`` and row ``horizon + f (h_cam - Y) / z``. The ground, the two facade
planes along the street and a far skyline are analytic surfaces evaluated for every pixel at once;
objects (cars, people, poles, trees, ...) are upright billboards at one distance each. A z-buffer keeps
the nearest surface per pixel, which gives the label, the depth and the 3-D point of every pixel.

Besides the clear-day colours the scene records what the weather and time-of-day renderer
(:mod:`semla_demo.weather`) needs: how much each surface faces up (snow settles there), the light
sources that shine at night (lamp heads, car lights, lit windows) and the street lamps' positions.
Everything is drawn from the ``numpy.random.Generator`` passed in; the work is vectorised over pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .canvas import (
    BUILDING,
    BUILDING_COLOURS,
    CAR_COLOURS,
    CLASS_NAMES,
    FENCE,
    GAMMA,
    GREENS,
    IGNORE,
    NUM_CLASSES,
    ROAD,
    SIDEWALK,
    SKY,
    SKY_DEPTH,
    TERRAIN,
    TEXTURE,
    VEGETATION,
    WALL,
    Camera,
    Canvas,
    Street,
    categorical,
    jitter,
    lookup,
    pick,
    value_noise,
)
from .things import draw_things

__all__ = [
    "CLASS_NAMES",
    "IGNORE",
    "NUM_CLASSES",
    "SKY_DEPTH",
    "Camera",
    "Scene",
    "Street",
    "generate_scene",
    "value_noise",
]

logger = logging.getLogger(__name__)


@dataclass
class Scene:
    """One street scene (all maps (H, W, ...)).

    Attributes:
        image: (H, W, 3) uint8 sRGB clear-day rendering.
        label: (H, W) uint8 Cityscapes train ids 0-18; 255 on the ego car's bonnet.
        depth: (H, W) float32 distance from the camera along each pixel's ray, metres; ``SKY_DEPTH`` on
            sky pixels (the farthest value).
        points: (H, W, 3) float32 world position of each pixel's surface (lateral u, height, forward z),
            metres; the camera sits at (``camera.lateral``, ``camera.height``, 0).
        up: (H, W) float32 in [0, 1], how much the surface faces up (1 = ground, car roofs); snow settles
            there and wet ground mirrors the scene.
        sunlight: (H, W, 3) float32 linear factor of direct sunlight in ``image`` (1 = sunlit, < 1 in a
            cast shadow or on the facade facing away from the sun); without the sun (overcast, night)
            a surface's radiance is ``image`` linearised and divided by it.
        emission: (H, W, 3) float32 linear radiance of the light sources that shine at night (lamp heads,
            car lights, lit windows, traffic lights), in units of a white surface under daylight.
        lamps: (L, 6) float32 street lamps: position (u, height, z) in metres and linear RGB power (the
            irradiance they give at 1 m, in units of daylight).
        instances: (H, W) int32 object instance ids, 0 where no countable object is seen.
        instance_classes: (K + 1,) uint8 train id of each instance id (entry 0 is 255).
        camera: the camera.
        street: the street layout.
    """

    image: np.ndarray
    label: np.ndarray
    depth: np.ndarray
    points: np.ndarray
    up: np.ndarray
    sunlight: np.ndarray
    emission: np.ndarray
    lamps: np.ndarray
    instances: np.ndarray
    instance_classes: np.ndarray
    camera: Camera
    street: Street

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.label.shape[0], self.label.shape[1]

    @property
    def sky(self) -> np.ndarray:
        """(H, W) bool, the pixels that see the sky."""
        return self.depth >= SKY_DEPTH

    def object_counts(self, min_pixels: int = 2) -> dict[int, int]:
        """Visible objects per train id: instances with at least ``min_pixels`` pixels in view."""
        ids, counts = np.unique(self.instances[self.instances > 0], return_counts=True)
        out: dict[int, int] = {}
        for cls in self.instance_classes[ids[counts >= min_pixels]]:
            out[int(cls)] = out.get(int(cls), 0) + 1
        return out


# ----------------------------------------------------------------------------------------------------
# layout


def _camera_and_street(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Camera, Street]:
    """A street of 2+ lanes (sometimes with parking strips) and a camera driving in a right-hand lane."""
    h, w = size
    road = rng.uniform(3.5, 8.0)
    parking = 2.3 if road >= 6.0 and rng.random() < 0.7 else 0.0
    lanes_half = road - parking
    n_lanes = max(2, int(round(2 * lanes_half / 3.4)))
    lane = 2 * lanes_half / n_lanes
    centres = -lanes_half + lane * (np.arange(n_lanes) + 0.5)
    ego = centres[centres > 0] if (centres > 0).any() else centres[-1:]
    lateral = float(rng.choice(ego)) + rng.uniform(-0.3, 0.3)  # right-hand traffic: drive right of centre
    sidewalk = (rng.uniform(1.5, 4.5), rng.uniform(1.5, 4.5))
    left, right = (0.0 if rng.random() < 0.5 else rng.uniform(1.0, 6.0) for _ in range(2))
    camera = Camera(
        focal=w * rng.uniform(0.8, 1.05),
        cx=w * (0.5 + rng.uniform(-0.06, 0.06)),
        horizon=h * rng.uniform(0.38, 0.5),
        height=rng.uniform(1.3, 1.8),
        lateral=lateral,
    )
    return camera, Street(road, lanes_half, lane, sidewalk, (left, right))


# ----------------------------------------------------------------------------------------------------
# stuff: sky, ground, facades, skyline


def _sky(cv: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Fill the sky: zenith-to-horizon gradient plus clouds. Returns the (3,) horizon colour."""
    zenith = np.array([rng.uniform(0.22, 0.45), rng.uniform(0.42, 0.60), rng.uniform(0.72, 0.95)])
    horizon = np.array([rng.uniform(0.68, 0.85), rng.uniform(0.78, 0.90), rng.uniform(0.88, 0.97)])
    t = np.clip((cv.cam.horizon - cv.ys) / max(cv.cam.horizon, 1.0), 0, 1) ** 0.7  # (H, 1)
    rgb = horizon * (1 - t[..., None]) + zenith * t[..., None]
    cover = rng.uniform(0.0, 0.7)
    clouds = value_noise(rng, (cv.h, cv.w), (3, int(rng.integers(3, 7))))
    amount = np.clip((clouds - (1 - cover)) / 0.25, 0, 1)[..., None] * rng.uniform(0.6, 0.95)
    cv.rgb[:] = rgb * (1 - amount) + np.array([0.93, 0.93, 0.95]) * amount
    return horizon


def _ground(cv: Canvas, rng: np.random.Generator, street: Street, sun: int, shadow: float) -> None:
    """Road (markings, zebra crossing), kerbs, sidewalks and grass on the plane height = 0."""
    cam = cv.cam
    first = int(np.searchsorted(cv.ys[:, 0], cam.horizon + 0.05, side="right"))  # first row below the horizon
    if first >= cv.h:
        return
    rs = slice(first, cv.h)
    hh = cv.h - first
    z = np.broadcast_to(cam.focal * cam.height / (cv.ys[rs] - cam.horizon), (hh, cv.w))  # forward distance
    u = (cv.xs - cam.cx) * z / cam.focal + cam.lateral  # (h, W) lateral position
    au, right = np.abs(u), (u > 0).astype(int)
    footprint = z / cam.focal  # metres covered by one pixel across the road: anti-aliases markings
    sidewalk = np.array(street.sidewalk)[right]
    road = au < street.road_half_width
    walk = ~road & (au < street.road_half_width + sidewalk)
    label = np.where(road, ROAD, np.where(walk, SIDEWALK, TERRAIN)).astype(np.uint8)

    tex = rng.standard_normal((TEXTURE, TEXTURE))
    asphalt = jitter(rng, np.full(3, rng.uniform(0.28, 0.46)), 0.04)
    paving = pick(rng, np.array([(0.62, 0.62, 0.60), (0.70, 0.64, 0.55), (0.60, 0.42, 0.38)]), 0.06)
    grass = pick(rng, np.array([(0.36, 0.46, 0.20), (0.45, 0.47, 0.26), (0.50, 0.44, 0.30)]), 0.06)
    patches = value_noise(rng, (hh, cv.w), (4, 4))[..., None]
    rgb_road = asphalt * (1 + 0.06 * lookup(tex, u / 0.4, z / 0.4)[..., None] + 0.12 * (patches - 0.5))
    # lane markings, blended by the fraction of the pixel they cover
    mark_rgb = np.array([0.88, 0.88, 0.86]) if rng.random() < 0.7 else np.array([0.88, 0.75, 0.20])
    q = (u + street.lanes_half_width) / street.lane_width
    k = np.round(q)
    n_lanes = round(2 * street.lanes_half_width / street.lane_width)
    centre = np.argmin(np.abs(-street.lanes_half_width + street.lane_width * np.arange(n_lanes + 1)))
    dist = np.abs(q - k) * street.lane_width
    period, width = rng.uniform(6, 12), rng.uniform(0.15, 0.25)
    dashed = (z / period) % 1.0 < 0.45
    lane_line = (k >= 1) & (k <= n_lanes - 1) & ((k == centre) | dashed)
    cover = np.clip((width / 2 - dist) / footprint + 0.5, 0, 1) * lane_line
    edge = np.clip((width / 2 - np.abs(au - (street.lanes_half_width - 0.25))) / footprint + 0.5, 0, 1)
    cover = np.maximum(cover, edge)  # solid edge lines along the driving lanes
    if rng.random() < 0.25:  # zebra crossing
        z0 = rng.uniform(8, 25)
        stripes = ((u / 1.0) % 1.0 < 0.5) & (z > z0) & (z < z0 + 3.5) & (au < street.lanes_half_width)
        cover = np.maximum(cover, stripes)
    rgb_road = rgb_road * (1 - cover[..., None]) + mark_rgb * cover[..., None]
    # pavers: one random brightness per 0.5 m tile; kerb stones along the road
    rgb_walk = paving * (1 + 0.07 * lookup(tex, u / 0.5 + 7, z / 0.5)[..., None])
    kerb = au < street.road_half_width + 0.25
    rgb_walk = np.where(kerb[..., None], jitter(rng, (0.66, 0.66, 0.64), 0.05), rgb_walk)
    rgb_grass = grass * (1 + 0.10 * lookup(tex, u / 0.3 + 3, z / 0.3 + 5)[..., None] + 0.2 * (patches - 0.5))
    rgb = np.where(road[..., None], rgb_road, np.where(walk[..., None], rgb_walk, rgb_grass))
    # the facades on the sun's side shade a strip of ground next to them (skylight only: bluish)
    sunlight = np.ones(3)
    if shadow > 0:
        line = street.building_line(1 if sun > 0 else 0)
        shade = (u * sun > line - shadow)[..., None]
        rgb = np.where(shade, rgb * _SHADE, rgb)
        sunlight = np.where(shade, _SHADE**GAMMA, 1.0)
    cv.paint(rs, slice(None), np.ones((1, 1), bool), z, label, rgb, up=1.0, sun=sunlight)


_SHADE = np.array([0.52, 0.55, 0.62])  # sRGB factor of ground in a facade's shadow (bluish skylight)
_AWAY = 0.72  # sRGB factor of the facade facing away from the sun

_SEGMENT_KINDS = (0.70, 0.10, 0.08, 0.06, 0.06)  # building / gap / hedge / wall / fence
_MAX_SEGMENTS = 40  # per side; 40 segments of >= 8 m reach past the farthest facade end (300 m)


def _segments(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Consecutive stretches of both sides of the street along z: buildings, hedges, walls, fences, gaps.

    Returns:
        ``edges`` (2, S + 1) segment boundaries (forward distance, metres), ``end`` (2,) where each side's
        facades stop, and (2 * S, ...) parameters of the segments, left side first.
    """
    n = _MAX_SEGMENTS
    lengths = rng.uniform(8.0, 30.0, (2, n))
    edges = rng.uniform(-6.0, 4.0, (2, 1)) + np.concatenate([np.zeros((2, 1)), np.cumsum(lengths, axis=1)], 1)
    kind = categorical(rng, _SEGMENT_KINDS, 2 * n)
    height = np.select(
        [kind == 0, kind == 2, kind == 3, kind == 4],
        [
            rng.uniform(6, 30, 2 * n),
            rng.uniform(1.2, 3.0, 2 * n),
            rng.uniform(1.0, 2.5, 2 * n),
            rng.uniform(1.0, 2.0, 2 * n),
        ],
        0.0,
    )
    wall = np.array([(0.62, 0.60, 0.56), (0.55, 0.36, 0.30), (0.72, 0.70, 0.66)])
    fence = np.array([(0.28, 0.32, 0.28), (0.45, 0.36, 0.26), (0.55, 0.56, 0.58)])
    choice = rng.integers(0, 24, 2 * n)  # 24 is a multiple of every palette's length
    colour = np.select(
        [(kind == k)[:, None] for k in (0, 2, 3)],
        [BUILDING_COLOURS[choice % 8], GREENS[choice % 4], wall[choice % 3]],
        fence[choice % 3],
    )
    return {
        "edges": edges,
        "end": rng.uniform(120, 300, 2),
        "kind": kind,
        "height": height,
        "colour": np.minimum(colour * rng.uniform(0.92, 1.08, (2 * n, 3)), 1.0),
        "glass": np.array([0.20, 0.25, 0.32]) * rng.uniform(0.75, 1.25, (2 * n, 3)),
        "period": rng.uniform(2.2, 3.8, 2 * n),
        "wfrac": rng.uniform(0.35, 0.6, 2 * n),
        "floor": rng.uniform(2.8, 3.6, 2 * n),
        "shop": rng.random(2 * n) < 0.5,
        "lit_p": rng.uniform(0.1, 0.6, 2 * n),
        "lit": rng.random((2 * n, 16, 16)),
        "lit_rgb": rng.uniform(0.15, 0.45, 2 * n)[:, None] * np.array([1.0, 0.78, 0.45]),
    }


def _facades(cv: Canvas, rng: np.random.Generator, street: Street, sun: int) -> None:
    """The two vertical planes ``u = -/+ building line`` facing the road, cut into segments along z.

    Both sides are evaluated in one pass: columns left of the vanishing point see the left facades.
    """
    cam = cv.cam
    tex = rng.standard_normal((TEXTURE, TEXTURE))
    seg = _segments(rng)
    n = _MAX_SEGMENTS
    dx = cv.xs - cam.cx  # (1, W)
    side = (dx > 0).astype(np.int64)  # 0 = left, 1 = right
    plane = np.where(side == 1, street.building_line(1), -street.building_line(0))  # (1, W) lateral position
    z = cam.focal * (plane - cam.lateral) / np.where(np.abs(dx) > 1e-3, dx, 1e-3)  # (1, W) forward distance
    edges = seg["edges"][side]  # (1, W, S + 1)
    valid = (np.abs(dx) > 1e-3) & (z > np.maximum(edges[..., 0], 0.5)) & (z < seg["end"][side])
    offset = 1e4 * side  # both sides' edges in one sorted list: the right side's shifted past the left's
    j = np.searchsorted((seg["edges"] + np.array([[0.0], [1e4]])).ravel(), z + offset, side="right") - 1
    s_idx = np.clip(j - side * (n + 1), 0, n - 1) + side * n  # (1, W) segment of each column
    kind, height = seg["kind"][s_idx], seg["height"][s_idx]
    y = cam.height - (cv.ys - cam.horizon) * z / cam.focal  # (H, W) height on the facade
    mask = valid & (kind != 1) & (y >= 0) & (y < height)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return
    rs = slice(int(rows[0]), int(rows[-1]) + 1)  # work on the rows the facades reach only
    y, mask = y[rs], mask[rs]
    # the facade facing the sun is lit by it, the other one by the sky only
    sunlit = np.where((side == 0) == (sun > 0), 1.0, _AWAY)[..., None]
    s = z - np.take_along_axis(edges, np.clip(j - side * (n + 1), 0, n)[..., None], axis=-1)[..., 0]
    rgb = seg["colour"][s_idx] * sunlit * (1 + 0.05 * lookup(tex, s / 0.7, y / 0.7)[..., None])
    building = kind == 0
    rgb = np.where(((y > height - 0.4) & building)[..., None], rgb * 0.75, rgb)  # cornice
    # windows on a grid of floors x bays; lit ones shine at night
    period, wfrac, floor = seg["period"][s_idx], seg["wfrac"][s_idx], seg["floor"][s_idx]
    bay, fs = np.divmod(s / period, 1.0)
    level, fy = np.divmod(y / floor, 1.0)
    win = (np.abs(fs - 0.5) < wfrac / 2) & (fy > 0.3) & (fy < 0.8) & (level >= 1) & (y < height - 0.8)
    shop = seg["shop"][s_idx] & (level == 0) & (fs > 0.08) & (fs < 0.92) & (y > 0.3) & (y < 2.6)
    win, shop = win & building, shop & building
    glass = seg["glass"][s_idx] * (1 + 0.15 * fy[..., None])
    # far away a pixel spans several bays: show the mean of wall and glass instead of aliasing
    metres_per_px = z * z / (cam.focal * np.abs(plane - cam.lateral))
    detail = np.clip(1.5 - metres_per_px / period, 0, 1)[..., None]
    mean = rgb + 0.25 * wfrac[..., None] * (glass - rgb)
    windowed = np.where((win | shop)[..., None], glass, rgb)
    rgb = np.where(building[..., None], mean + detail * (windowed - mean), rgb)
    lit_table = seg["lit"][s_idx, bay.astype(np.int64) % 16, level.astype(np.int64) % 16]
    lit = (win & (lit_table < seg["lit_p"][s_idx])) | (shop & (lit_table < 0.5))
    emit = np.where(lit[..., None], seg["lit_rgb"][s_idx] * np.where(shop, 1.2, 1.0)[..., None], 0.0)
    # fences: posts every 2.5 m and a top rail over a mesh (a checker in image space); hedges: leaves
    hh, ww = mask.shape
    checker = ((np.arange(hh)[:, None] + np.arange(ww)[None, :]) % 2) * 0.25 + 0.75
    post = ((s / 2.5) % 1.0 < 0.08) | (y > height - 0.12)
    texture = np.select(
        [kind == 4, kind == 2], [np.where(post, 0.6, checker), 1 + 0.25 * rng.standard_normal((hh, ww))], 1.0
    )
    rgb = rgb * texture[..., None]
    label = np.select([building, kind == 2, kind == 3], [BUILDING, VEGETATION, WALL], FENCE)
    up = np.where((kind >= 2) & (y > height - 0.3), 0.7, 0.0)
    cv.paint(
        rs, slice(None), mask, np.broadcast_to(z, mask.shape), label, rgb, up=up, emit=emit, sun=sunlit**GAMMA
    )


def _skyline(cv: Canvas, rng: np.random.Generator, haze: np.ndarray) -> None:
    """A far row of buildings and tree lines across the end of the street (plane z = const)."""
    cam = cv.cam
    z = rng.uniform(90, 260)
    widths = rng.uniform(8, 30, 64)
    starts = np.concatenate([[-400.0], -400.0 + np.cumsum(widths)])
    kind = categorical(rng, (0.6, 0.25, 0.15), 64)  # building / trees / nothing
    height = np.where(kind == 0, rng.uniform(8, 50, 64), np.where(kind == 1, rng.uniform(6, 15, 64), 0.0))
    colour = np.where(
        (kind == 0)[:, None],
        BUILDING_COLOURS[rng.integers(len(BUILDING_COLOURS), size=64)],
        GREENS[rng.integers(len(GREENS), size=64)],
    ) * rng.uniform(0.92, 1.08, (64, 3))
    u = (cv.xs - cam.cx) * z / cam.focal + cam.lateral  # (1, W)
    idx = np.clip(np.searchsorted(starts, u, side="right") - 1, 0, 63)
    y = cam.height - (cv.ys - cam.horizon) * z / cam.focal  # (H, 1)
    mask = (y >= 0) & (y < height[idx])
    # aerial perspective: a few hundred metres of clear air already veil the far row a little
    rgb = np.broadcast_to(colour[idx] * 0.65 + haze * 0.35, (cv.h, cv.w, 3))
    city = (kind[idx] == 0) & (rng.random((cv.h, cv.w)) < 0.12)
    emit = np.where(city[..., None], np.array([0.25, 0.2, 0.12]), 0.0)
    cv.paint(
        slice(None), slice(None), mask, z, np.where(kind[idx] == 0, BUILDING, VEGETATION), rgb, emit=emit
    )


def _hood(cv: Canvas, rng: np.random.Generator) -> None:
    """The ego car's bonnet at the bottom of the image (ignored in evaluation, as in Cityscapes)."""
    depth = rng.uniform(0.06, 0.12) * cv.h
    rows = cv.h - depth + 0.25 * depth * ((cv.xs - cv.w / 2) / (cv.w / 2)) ** 2  # (1, W) top edge
    mask = cv.ys > rows
    paint = pick(rng, CAR_COLOURS, 0.05) * 0.8
    fade = np.clip((cv.ys - rows) / depth, 0, 1)[..., None]
    rgb = np.broadcast_to(paint * (1.15 - 0.4 * fade), (cv.h, cv.w, 3))
    cv.paint(slice(None), slice(None), mask, 1.0, IGNORE, rgb)


# ----------------------------------------------------------------------------------------------------
# the scene


def generate_scene(rng: np.random.Generator, size: tuple[int, int] = (64, 64)) -> Scene:
    """Draw one street scene.

    Args:
        rng: source of all randomness (the same state gives the same scene).
        size: (height, width) in pixels, each >= 16.
    Returns:
        The scene, with its clear-day rendering in ``image``.
    """
    h, w = size
    if h < 16 or w < 16:
        raise ValueError(f"scene size must be at least 16 x 16 pixels, got {size}")
    camera, street = _camera_and_street(rng, (h, w))
    cv = Canvas((h, w), camera)
    sun = int(rng.choice([-1, 1]))  # which side of the street the sun shines from
    shadow = rng.uniform(0.0, 9.0) if rng.random() < 0.6 else 0.0
    haze = _sky(cv, rng)
    if rng.random() < 0.85:
        _skyline(cv, rng, haze)
    _ground(cv, rng, street, sun, shadow)
    _facades(cv, rng, street, sun)
    lamps = draw_things(cv, rng, street)
    if rng.random() < 0.3:
        _hood(cv, rng)

    # points and ray distances from the z-buffer (exact for the level pinhole camera)
    sky = cv.label == SKY
    z = cv.z
    x_n = (cv.xs - camera.cx) / camera.focal  # (1, W) tangent of the horizontal angle
    y_n = (cv.ys - camera.horizon) / camera.focal  # (H, 1) tangent of the depression angle
    points = np.stack(
        [np.broadcast_to(camera.lateral + x_n * z, z.shape), camera.height - y_n * z, z], axis=-1
    )
    depth = np.where(sky, SKY_DEPTH, np.minimum(z * np.sqrt(1 + x_n**2 + y_n**2), 0.9 * SKY_DEPTH))
    # a fine grain over everything, as no real surface is perfectly uniform
    rgb = cv.rgb * (1 + 0.02 * rng.standard_normal((h, w, 1)))
    image = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
    return Scene(
        image=image,
        label=cv.label,
        depth=depth.astype(np.float32),
        points=points.astype(np.float32),
        up=cv.up.astype(np.float32),
        sunlight=cv.sun.astype(np.float32),
        emission=cv.emit.astype(np.float32),
        lamps=lamps.astype(np.float32),
        instances=cv.inst,
        instance_classes=np.array(cv.inst_classes, dtype=np.uint8),
        camera=camera,
        street=street,
    )
