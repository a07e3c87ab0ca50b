"""Weather and time of day as physically motivated functions of a scene's clear rendering and depth.

``render(scene, weather, time, rng)`` turns the clear-day colours into linear radiance (sRGB gamma 2.2;
without direct sun, under clouds or at night, the sun's shading is divided out), changes the surfaces
(snow cover, wet ground), lights the scene (daylight, or at night a dim ambient light, street lamps and
the ego car's headlights plus the light sources' own emission), mirrors the scene in wet ground, adds
the atmosphere (Koschmieder's law over each pixel's distance), the glow of light sources, falling rain
or snow in front of everything, and finally images it with a noisy camera (Poisson-Gaussian shot and
read noise, exposure gain, gamma, 8 bits).

Weather and time combine freely: fog at night is the night lighting seen through fog with a dim airlight
and wide halos around the lamps. The labels never change (streaks and flakes are not labelled).
All randomness comes from the ``numpy.random.Generator`` passed in; everything is vectorised.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np

from .canvas import GAMMA, ROAD, SIDEWALK, value_noise
from .scene import Scene

logger = logging.getLogger(__name__)

WEATHERS = ("clear", "fog", "rain", "snow")
TIMES = ("day", "night")

_KOSCHMIEDER = 3.912  # -ln(0.02): visibility V is where the contrast of a black object falls to 2 %
_PHOTONS = 3000.0  # photo-electrons collected at full scale (sets the shot noise)
_READ_NOISE = 0.0012  # read noise, in units of full scale


def _blur_rows(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an (H, W, C) array along its rows' direction (vertical), edges repeated."""
    if sigma <= 0:
        return image
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    h = image.shape[0]
    padded = np.concatenate([np.repeat(image[:1], radius, 0), image, np.repeat(image[-1:], radius, 0)])
    out = np.zeros_like(image, dtype=np.float64)
    for i, tap in enumerate(taps):
        out += tap * padded[i : i + h]
    return out


def _binomial(image: np.ndarray) -> np.ndarray:
    """(H, W, C) blurred by the separable [1, 2, 1] / 4 kernel (a Gaussian of sigma ~0.7 px), zero outside."""
    rows = 0.5 * image
    rows[1:] += 0.25 * image[:-1]
    rows[:-1] += 0.25 * image[1:]
    out = 0.5 * rows
    out[:, 1:] += 0.25 * rows[:, :-1]
    out[:, :-1] += 0.25 * rows[:, 1:]
    return out


def _wide_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an (H, W, C) array with a wide sigma (pixels), computed at half resolution with one
    FFT pair (the result is smooth); zero-padded, so no light wraps around the frame."""
    h, w, c = image.shape
    he, we = h + h % 2, w + w % 2
    half = (
        np.pad(image, ((0, he - h), (0, we - w), (0, 0))).reshape(he // 2, 2, we // 2, 2, c).sum(axis=(1, 3))
    )
    s = sigma / 2
    pad = int(np.ceil(1.5 * s)) + 1  # the cyclic wrap of 2 pad >= 3 sigma lands in the zero padding
    shape = (he // 2 + 2 * pad, we // 2 + 2 * pad)
    fy = np.fft.fftfreq(shape[0])[:, None, None]
    fx = np.fft.rfftfreq(shape[1])[None, :, None]
    transfer = np.exp(-2 * (np.pi * s) ** 2 * (fy**2 + fx**2))  # real and even: a centred kernel
    blurred = np.fft.irfft2(np.fft.rfft2(half, s=shape, axes=(0, 1)) * transfer, s=shape, axes=(0, 1))
    up = np.repeat(np.repeat(blurred[: he // 2, : we // 2] / 4, 2, axis=0), 2, axis=1)  # energy per pixel
    return _binomial(up)[:h, :w]  # smooth the 2 x 2 blocks


# ----------------------------------------------------------------------------------------------------
# surfaces


def _snow_cover(scene: Scene, lin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Snow lies on surfaces that face up, patchily; on the road it is thinner and cleared in tyre tracks."""
    h, w = scene.size
    amount = rng.uniform(0.55, 0.95)
    patches = value_noise(rng, (h, w), (6, 6))
    cover = np.clip(amount + 0.6 * (patches - 0.5), 0, 1) * scene.up
    street = scene.street
    q = ((scene.points[..., 0] + street.lanes_half_width) / street.lane_width) % 1.0  # position in a lane
    tracks = (np.abs(q - 0.28) < 0.07) | (np.abs(q - 0.72) < 0.07)
    road = scene.label == ROAD
    cover = np.where(road, cover * rng.uniform(0.3, 0.8) * np.where(tracks, 0.15, 1.0), cover)
    # fresh snow reflects ~80-90 % of daylight, a little more in blue
    snow = np.array([0.82, 0.85, 0.92]) * rng.uniform(0.85, 1.0) * (1 + 0.04 * rng.standard_normal((h, w, 1)))
    return lin * (1 - cover[..., None]) + snow * cover[..., None]


def _wetness(scene: Scene, lin: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rain wets the road and sidewalks; puddles form. Water filling the pores darkens a surface
    (Lekner & Dorf 1988). Returns the darkened radiance and the (H, W) wetness in [0, 1]."""
    h, w = scene.size
    ground = np.isin(scene.label, (ROAD, SIDEWALK)) & (scene.up > 0.5)
    puddles = value_noise(rng, (h, w), (5, 8)) > rng.uniform(0.6, 0.8)
    wet = np.where(ground, np.where(puddles, 1.0, rng.uniform(0.5, 0.85)), 0.0)
    return lin * (1 - rng.uniform(0.4, 0.6) * wet[..., None]), wet


# ----------------------------------------------------------------------------------------------------
# light


def _daylight(scene: Scene, lin: np.ndarray, weather: str, rng: np.random.Generator) -> np.ndarray:
    """Daylight level: full sun when clear, diffuse and dimmer under fog, rain and snow clouds."""
    low, high = {"clear": (0.9, 1.1), "fog": (0.7, 0.9), "rain": (0.5, 0.7), "snow": (0.7, 0.9)}[weather]
    return lin * rng.uniform(low, high) * rng.uniform(0.97, 1.03, 3)


def _night(scene: Scene, lin: np.ndarray, weather: str, rng: np.random.Generator) -> np.ndarray:
    """Night: reflectance x (dim ambient + street lamps + ego headlights) + the light sources' emission.

    Irradiance from a point source falls off with the squared distance and the cosine of incidence.
    The sky turns dark, with the orange glow of the city towards the horizon (stronger under clouds).
    """
    h, w = scene.size
    cam = scene.camera
    pts = scene.points  # (H, W, 3) float32 (u, height, z)
    tint = np.array([0.8, 0.9, 1.15]) if rng.random() < 0.5 else np.array([1.1, 0.95, 0.75])  # moon / city
    irradiance = rng.uniform(0.025, 0.05) * tint
    up = scene.up[None]  # (1, H, W)
    lamps = scene.lamps
    if len(lamps):
        # vectors from each surface point to each lamp, (L, H, W) per coordinate
        du, dy, dz = (lamps[:, i, None, None] - pts[None, ..., i] for i in range(3))
        d2 = du * du + dy * dy + dz * dz + 0.25
        cos = up * np.maximum(dy, 0) / np.sqrt(d2) + (1 - up) * 0.5  # ground: lamp overhead
        irradiance = irradiance + np.einsum("lhw,lc->hwc", np.maximum(cos, 0.05) / d2, lamps[:, 3:])
    # ego low beams: a cone ahead, cut off above the horizontal
    delta = pts - np.array([cam.lateral, 0.7, 0.0], dtype=np.float32)
    ahead = np.maximum(delta[..., 2], 1e-3)
    beam = np.exp(-((delta[..., 0] / ahead / 0.35) ** 2) - np.maximum(delta[..., 1] / ahead - 0.02, 0) / 0.05)
    beam *= rng.uniform(3.0, 6.0) / ((delta**2).sum(-1) + 1.0) * (delta[..., 2] > 0.5)
    irradiance = irradiance + beam[..., None] * np.array([1.0, 0.97, 0.9])
    out = lin * irradiance + scene.emission * rng.uniform(0.8, 1.2)
    # night sky: nearly black overhead, city glow at the horizon
    overcast = weather in ("rain", "snow", "fog")
    glow = rng.uniform(0.005, 0.02) * (3.0 if overcast else 1.0)
    s = np.clip((cam.horizon - (np.arange(h) + 0.5)) / max(cam.horizon, 1.0), 0, 1)[:, None, None]
    sky_rgb = np.array([0.002, 0.003, 0.006]) + glow * (1 - s) ** 2 * np.array([1.0, 0.75, 0.5])
    return np.where(scene.sky[..., None], sky_rgb, out)


def _reflections(scene: Scene, lin: np.ndarray, wet: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Wet ground mirrors the scene, more at grazing angles (Fresnel; Schlick's approximation, water).

    A point at height Y and distance z is seen in a flat mirror at the row mirrored about its own ground
    contact, ``2 (horizon + f h / z) - row``; the nearest surface wins a mirrored pixel. Ripples blur the
    mirror image vertically, which stretches lamps into the streaks typical of wet roads at night.
    """
    h, w = scene.size
    cam = scene.camera
    z = scene.points[..., 2].astype(np.float64)
    rows = (np.arange(h) + 0.5)[:, None]
    target = np.floor(2 * (cam.horizon + cam.focal * cam.height / z) - rows).astype(np.int64)  # (H, W)
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w))
    source = ((scene.points[..., 1] > 0.05) | scene.sky) & (target >= 0) & (target < h)
    tgt = (np.where(source, target, 0) * w + cols)[source]
    keep = wet.ravel()[tgt] > 0
    tgt, src = tgt[keep], np.flatnonzero(source)[keep]
    nearest = np.full(h * w, np.inf)
    np.minimum.at(nearest, tgt, z.ravel()[src])
    win = z.ravel()[src] <= nearest[tgt]
    mirror_rows = np.clip(np.floor(2 * cam.horizon - rows), 0, h - 1).astype(np.int64)
    mirror = lin[mirror_rows[:, 0]]  # fallback: the scene mirrored about the horizon (objects at infinity)
    flat = mirror.reshape(-1, 3).copy()
    flat[tgt[win]] = lin.reshape(-1, 3)[src[win]]
    mirror = _blur_rows(flat.reshape(h, w, 3), rng.uniform(0.6, 1.5) * w / 64)
    cos = np.clip(cam.height / np.maximum(scene.depth, 1e-3), 0, 1)
    fresnel = 0.02 + 0.98 * (1 - cos) ** 5
    # a water film on rough asphalt is a partial mirror; standing water (puddles, wet = 1) a full one
    specular = np.where(wet >= 1.0, 1.0, rng.uniform(0.3, 0.6))
    k = (fresnel * wet * specular)[..., None]
    return lin * (1 - k) + mirror * k


# ----------------------------------------------------------------------------------------------------
# atmosphere


def _medium(scene: Scene, weather: str, time: str, rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """Extinction coefficient beta (1/m) and airlight A ((H, W, 3) linear radiance of the horizon).

    Koschmieder: beta = 3.912 / V for a meteorological visibility V. Fog: V 60-180 m; rain 250-700 m;
    snowfall 150-500 m; clear: no medium. The airlight is bright grey by day (overcast sky) and a dim
    orange (city light scattered back) at night.
    """
    h, w = scene.size
    if weather == "clear":
        return 0.0, np.zeros(3)
    visibility = {"fog": (60, 180), "rain": (250, 700), "snow": (150, 500)}[weather]
    beta = _KOSCHMIEDER / rng.uniform(*visibility)
    if time == "day":
        level = {"fog": (0.55, 0.8), "rain": (0.3, 0.5), "snow": (0.5, 0.75)}[weather]
        colour = rng.uniform(*level) * np.array([1.0, 1.01, 1.04])
    else:
        colour = rng.uniform(0.008, 0.025) * np.array([1.1, 0.95, 0.8])
    mottling = 1 + 0.12 * (value_noise(rng, (h, w), (3, 4)) - 0.5) * (weather != "fog")
    return beta, colour * mottling[..., None]


def _glow(
    scene: Scene, transmission: np.ndarray, weather: str, beta: float, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Halos around light sources: light scattered forward by the medium (and the lens), a blurred copy
    of the visible emission, wider and stronger in denser media (cf. Narasimhan & Nayar 2003).

    Returns:
        (H, W, 3) glow to add, and (H, W, 3) the light arriving around each pixel from nearby sources
        (a wide blur of the emission), which lights falling rain and snow.
    """
    emission = scene.emission * transmission[..., None]
    if not emission.any():
        return np.zeros_like(emission), np.zeros_like(emission)
    near, far = {"clear": (0.25, 0.05), "rain": (0.5, 0.15), "snow": (0.5, 0.15), "fog": (0.6, 0.4)}[weather]
    far += 8.0 * beta  # optical thickness of the path to the sources
    small = _binomial(emission) if scale < 1.5 else _wide_blur(emission, 0.8 * scale)
    large = _wide_blur(emission, 3.5 * scale)
    return near * small + far * large, large


# ----------------------------------------------------------------------------------------------------
# precipitation


def _splat(size: tuple[int, int], x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Sum ``weight`` into the pixels at (x, y) (any shape, pixel coordinates); points outside are dropped."""
    h, w = size
    xi, yi = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    return np.bincount((yi * w + xi)[inside], weights=weight[inside], minlength=h * w).reshape(h, w)


def _rain(scene: Scene, lin: np.ndarray, lit: np.ndarray, time: str, rng: np.random.Generator) -> np.ndarray:
    """Falling drops imaged as motion-blurred streaks (Garg & Nayar 2007): a drop at distance d falling
    at ~9 m/s during the exposure T draws a line of length f v T / d pixels, faint because it crosses
    each pixel only briefly, and bright because it refracts light from a wide field of view."""
    h, w = scene.size
    cam = scene.camera
    n = int(rng.uniform(80, 160) * h * w / 4096)
    d = np.exp(rng.uniform(np.log(0.4), np.log(8.0), n))  # distance of each drop, metres
    exposure = rng.uniform(1 / 100, 1 / 40) * (1.5 if time == "night" else 1.0)
    length = np.clip(cam.focal * 9.0 * exposure / d, 2.0, 0.5 * h)
    wind = rng.normal(0, 0.2)
    angle = wind + rng.normal(0, 0.04, n)
    alpha = rng.uniform(0.15, 0.4, n)
    m = int(np.ceil(length.max())) + 1
    s = np.linspace(0.0, 1.0, m)[None, :]
    x = rng.uniform(-0.2 * w, 1.2 * w, n)[:, None] + np.sin(angle)[:, None] * length[:, None] * s
    y = rng.uniform(-0.5 * h, h, n)[:, None] + np.cos(angle)[:, None] * length[:, None] * s
    weight = np.broadcast_to((alpha * length / m)[:, None], x.shape)
    cover = np.minimum(_splat((h, w), x, y, weight), 0.8)[..., None]
    # a drop refracts a wide field of view: the (overcast) sky by day, the lights around it at night
    radiance = lit * (rng.uniform(1.0, 1.3) if time == "day" else 2.0) + (0.02 if time == "night" else 0.0)
    return lin * (1 - cover) + radiance * cover


def _snowfall(
    scene: Scene, lin: np.ndarray, lit: np.ndarray, time: str, rng: np.random.Generator
) -> np.ndarray:
    """Flakes at several distances: near ones large and soft (out of focus), far ones single dim dots."""
    h, w = scene.size
    scale = w / 64
    n = int(rng.uniform(60, 200) * h * w / 4096)
    d = np.exp(rng.uniform(np.log(0.5), np.log(12.0), n))
    radius = np.clip(0.6 * scale * (3.0 / d) ** 0.8, 0.35, 2.8 * scale)  # pixels
    alpha = np.clip(0.95 - 0.15 * radius / scale, 0.3, 0.9) * rng.uniform(0.6, 1.0, n)
    stretch = rng.uniform(1.0, 1.6, n)  # a little motion blur along the fall
    cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    # a far flake is a sharp dot: centre it on a pixel so it is not smeared over four dim ones
    dot = radius < 0.8 * scale
    cx, cy = np.where(dot, np.floor(cx) + 0.5, cx), np.where(dot, np.floor(cy) + 0.5, cy)
    alpha = np.where(dot, rng.uniform(0.6, 1.0, n), alpha)
    cover = np.zeros((h, w))
    small = radius * stretch < 1.0
    for group in (small, ~small):  # small flakes need a small footprint: draw them with a 5 x 5 one
        if not group.any():
            continue
        reach = int(np.ceil(2.2 * (radius * stretch)[group].max()))
        off = np.arange(-reach, reach + 1)
        ox, oy = np.meshgrid(off, off, indexing="xy")
        px = np.floor(cx[group])[:, None] + ox.ravel()[None, :] + 0.5  # (n, K) pixel centres around a flake
        py = np.floor(cy[group])[:, None] + oy.ravel()[None, :] + 0.5
        rx, ry = radius[group][:, None], (radius * stretch)[group][:, None]
        r2 = ((px - cx[group][:, None]) / rx) ** 2 + ((py - cy[group][:, None]) / ry) ** 2
        cover += _splat((h, w), px, py, alpha[group][:, None] * np.exp(-r2))
    cover = np.minimum(cover, 1.0)[..., None]
    if time == "day":  # flakes scatter daylight diffusely: white
        radiance = np.array([0.95, 0.95, 0.98]) * rng.uniform(0.7, 1.0)
    else:  # lit by the lamps around and the ego headlights
        radiance = 3.0 * lit + 0.05
    return lin * (1 - cover) + radiance * cover


# ----------------------------------------------------------------------------------------------------
# camera


def _camera(lin: np.ndarray, time: str, rng: np.random.Generator) -> np.ndarray:
    """Expose, add shot and read noise, apply the exposure gain and the gamma, quantise to 8 bits.

    Noise follows the Poisson-Gaussian sensor model (Foi et al. 2008): shot noise with variance
    ``signal / photons`` (Gaussian approximation of the Poisson count) plus read noise. At night the
    same sensor collects far fewer photons and the gain is raised, so the noise is relatively stronger.
    """
    gain = rng.uniform(0.95, 1.05) if time == "day" else rng.uniform(1.8, 2.8)
    signal = np.maximum(lin, 0.0)
    noisy = signal + np.sqrt(signal / _PHOTONS + _READ_NOISE**2) * rng.standard_normal(lin.shape)
    # gamma through a table over 4096 linear levels: 8-bit output needs no finer steps
    code = np.clip(noisy * (gain * (_GAMMA_LEVELS - 1)), 0, _GAMMA_LEVELS - 1).astype(np.int64)
    return _gamma_table()[code]


_GAMMA_LEVELS = 4096


@lru_cache(maxsize=1)
def _gamma_table() -> np.ndarray:
    """(4096,) uint8: linear level -> sRGB code value (gamma 1 / 2.2)."""
    levels = (np.arange(_GAMMA_LEVELS) + 0.5) / _GAMMA_LEVELS
    table = np.round(levels ** (1 / GAMMA) * 255).astype(np.uint8)
    table[0] = 0
    return table


def render(scene: Scene, weather: str, time: str, rng: np.random.Generator) -> np.ndarray:
    """Image a scene under a weather and a time of day.

    Args:
        scene: the scene (its ``image`` is the clear-day reflectance under daylight).
        weather: one of ``WEATHERS``.
        time: one of ``TIMES``.
        rng: source of the condition's randomness (fog density, lamp brightness, drops, noise, ...).
    Returns:
        (H, W, 3) uint8 sRGB image.
    """
    if weather not in WEATHERS or time not in TIMES:
        raise ValueError(f"condition must be in {WEATHERS} x {TIMES}, got {weather!r}, {time!r}")
    h, w = scene.size
    scale = w / 64
    lin = (scene.image / 255.0) ** GAMMA
    if weather != "clear" or time == "night":  # no direct sun: no cast shadows, no sunny side
        lin = lin / scene.sunlight
    wet = None
    if weather == "snow":
        lin = _snow_cover(scene, lin, rng)
    elif weather == "rain":
        lin, wet = _wetness(scene, lin, rng)
    lin = _daylight(scene, lin, weather, rng) if time == "day" else _night(scene, lin, weather, rng)
    beta, airlight = _medium(scene, weather, time, rng)
    if wet is not None:
        if time == "day":  # an overcast sky is what the wet ground mirrors first
            lin = np.where(scene.sky[..., None], airlight, lin)
        lin = _reflections(scene, lin, wet, rng)
    # Koschmieder's law: I = J t + A (1 - t), t = exp(-beta d)
    transmission = np.exp(-beta * scene.depth.astype(np.float64))
    lin = lin * transmission[..., None] + airlight * (1 - transmission[..., None])
    lit = airlight  # what falling drops and flakes show: the sky by day, the lights around them at night
    if time == "night":
        glow, surround = _glow(scene, transmission, weather, beta, scale)
        lin = lin + glow
        lit = airlight + surround
    if weather == "rain":
        lin = _rain(scene, lin, lit, time, rng)
    elif weather == "snow":
        lin = _snowfall(scene, lin, lit, time, rng)
    return _camera(lin, time, rng)
