"""The objects of a street scene (cars, trucks, buses, people, riders with their bicycles or
motorcycles, street lamps, traffic signs and lights, trees): placed first as per-object parameters,
then drawn kind by kind, each kind in one vectorised pass over the pixels of all its objects.

Every object is an upright billboard at one forward distance. Shapes are written in metres around the
object's axis (``x`` lateral, ``y`` height above the road), so they scale with distance; parts thinner
than a pixel (poles, arms, wheels seen from behind) are widened to one pixel so they never vanish.
"""

from __future__ import annotations

import numpy as np

from .canvas import (
    BICYCLE,
    BUS,
    CAR,
    CAR_COLOURS,
    CLOTHES,
    GREENS,
    LAMP_LIGHT,
    MOTORCYCLE,
    PERSON,
    POLE,
    RIDER,
    SKIN,
    TRAFFIC_LIGHT,
    TRAFFIC_SIGN,
    TRUCK,
    VEGETATION,
    Camera,
    Canvas,
    Street,
    categorical,
    palette_colours,
    shade,
    thin,
)

# ----------------------------------------------------------------------------------------------------
# placement


def _as_arrays(rows: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """List of per-object dicts -> dict of (N,) arrays (empty dict for no objects)."""
    return {key: np.array([r[key] for r in rows], dtype=np.float64) for key in rows[0]} if rows else {}


def _place(rng: np.random.Generator, street: Street, cam: Camera) -> dict[str, dict[str, np.ndarray]]:
    """Positions (and a few per-object choices) of every object, by kind: (N,) arrays per parameter."""
    road, lanes = street.road_half_width, street.lanes_half_width
    kinds: dict[str, list[dict[str, float]]] = {
        k: [] for k in ("lamps", "trees", "persons", "vehicles", "bikes", "signs", "lights")
    }
    for side, sign in ((0, -1.0), (1, 1.0)):
        walk, grass = street.sidewalk[side], street.terrain[side]
        if rng.random() < 0.75:  # street lamps along the kerb, arms over the road
            z = rng.uniform(3, 20)
            while z < 90:
                kinds["lamps"].append({"u": sign * (road + 0.4), "z": z, "towards": -sign})
                z += rng.uniform(20, 35)
        if rng.random() < 0.65:  # a row of trees in the sidewalk or on the grass
            u = sign * (road + walk - 0.6) if grass < 1.0 else sign * (road + walk + grass / 2)
            z = rng.uniform(2, 12)
            while z < 70:
                kinds["trees"].append({"u": u + rng.uniform(-0.2, 0.2), "z": z})
                z += rng.uniform(8, 16)
        for _ in range(rng.poisson(1.4)):  # pedestrians on the sidewalk
            u = sign * rng.uniform(road + 0.4, road + max(walk - 0.3, 0.5))
            kinds["persons"].append({"u": u, "z": rng.uniform(4, 35)})
        if lanes < road - 1.0:  # parked cars, bonnet towards the traffic on their side, lights off
            z = rng.uniform(3, 10)
            while z < 50:
                if rng.random() < 0.7:
                    kinds["vehicles"].append(
                        {"u": sign * (road - 1.15), "z": z, "kind": CAR, "front": sign < 0, "on": 0}
                    )
                z += rng.uniform(5.5, 12)
        if rng.random() < 0.12:  # a parked bicycle, no rider
            kinds["bikes"].append(
                {"u": sign * (road + 0.8), "z": rng.uniform(5, 20), "motor": 0, "side": 1, "rider": 0}
            )
    # traffic in the driving lanes (right-hand traffic: the left half drives towards us, lights on)
    n_lanes = round(2 * lanes / street.lane_width)
    for centre in -lanes + street.lane_width * (np.arange(n_lanes) + 0.5):
        own = abs(centre - cam.lateral) < street.lane_width / 2
        zs = np.sort(rng.uniform(9 if own else 6, 60, rng.poisson(1.0)))
        keep = np.concatenate([[True], np.diff(zs) > 9]) if len(zs) else zs.astype(bool)
        for z in zs[keep]:
            kind = (CAR, TRUCK, BUS)[int(categorical(rng, (0.82, 0.10, 0.08), 1)[0])]
            u = centre + rng.uniform(-0.3, 0.3)
            kinds["vehicles"].append({"u": u, "z": z, "kind": kind, "front": centre < 0, "on": 1})
    if rng.random() < 0.3:  # a cyclist or motorcyclist, riding along the kerb or crossing
        crossing = rng.random() < 0.4
        u = rng.uniform(-lanes, lanes) if crossing else lanes - 0.7
        motor = rng.random() < 0.35
        kinds["bikes"].append({"u": u, "z": rng.uniform(6, 30), "motor": motor, "side": crossing, "rider": 1})
    if rng.random() < 0.15:  # someone crossing the road
        kinds["persons"].append({"u": rng.uniform(-road, road), "z": rng.uniform(8, 25)})
    for _ in range(int(categorical(rng, (0.35, 0.4, 0.25), 1)[0])):  # traffic signs at the kerb
        kinds["signs"].append({"u": rng.choice([-1.0, 1.0]) * (road + 0.5), "z": rng.uniform(5, 35)})
    if rng.random() < 0.35:  # an intersection: traffic lights on both kerbs, maybe one over the road
        z, state = rng.uniform(12, 40), int(rng.integers(3))
        for sign in (-1.0, 1.0):
            u = sign * (road + 0.5)
            kinds["lights"].append({"u": u, "z": z, "housing": u, "state": state, "over": 0})
        if rng.random() < 0.5:
            over = rng.uniform(0, lanes)
            kinds["lights"].append(
                {"u": road + 0.5, "z": z - 0.5, "housing": over, "state": state, "over": 1}
            )
    return {k: _as_arrays(v) for k, v in kinds.items()}


# ----------------------------------------------------------------------------------------------------
# drawing, one vectorised pass per kind


def _draw_vehicles(cv: Canvas, rng: np.random.Generator, p: dict[str, np.ndarray]) -> None:
    """Cars, trucks and buses seen from behind (tail lights) or from the front (headlights)."""
    n = len(p["u"])
    kind = p["kind"].astype(int)
    car = kind == CAR
    width = np.where(car, rng.uniform(1.7, 1.95, n), np.where(kind == TRUCK, 2.45, 2.55))
    height = np.where(car, rng.uniform(1.4, 1.65, n), np.where(kind == TRUCK, rng.uniform(3.0, 3.8, n), 3.2))
    paint = np.where(
        (kind == BUS)[:, None],
        palette_colours(
            rng, np.array([(0.85, 0.75, 0.15), (0.70, 0.12, 0.10), (0.88, 0.88, 0.86), (0.15, 0.45, 0.40)]), n
        ),
        palette_colours(rng, CAR_COLOURS, n, 0.06),
    )
    cargo_rgb = palette_colours(rng, np.array([(0.85, 0.85, 0.85)]), n, 0.1)
    glass_rgb = palette_colours(rng, np.array([(0.10, 0.12, 0.15)]), n, 0.2)
    inst = cv.new_instances(kind)
    hw = width / 2
    px = cv.boxes(p["u"], p["z"], -hw, hw, 0.0, height)
    o, y, ax = px.obj, px.y, np.abs(px.x)
    h, half, k, front = height[o], hw[o], kind[o], p["front"][o] > 0
    is_car = k == CAR
    cab_hw = half * (0.86 - 0.2 * np.clip((y - 0.6 * h) / (0.4 * h), 0, 1))
    cab = is_car & (y >= 0.6 * h) & (ax < cab_hw)
    body = np.where(is_car, ((y >= 0.22) & (y < 0.6 * h)) | cab, y >= 0.45)
    glass_car = cab & (y > 0.65 * h) & (y < 0.93 * h) & (ax < cab_hw - 0.1)
    glass_truck = np.where(front, (y > 1.8) & (y < 2.6) & (ax < half - 0.15), (ax < 0.03) & (y > 1.0))
    glass_bus = np.where(
        front, (y > 1.1) & (y < 2.7) & (ax < half - 0.12), (y > 2.0) & (y < 2.8) & (ax < half - 0.3)
    )
    glass = np.where(is_car, glass_car, np.where(k == TRUCK, glass_truck, glass_bus))
    lights = np.where(
        is_car,
        (y > 0.42 * h) & (y < 0.52 * h) & (ax > half - 0.36) & (ax < half - 0.05),
        (y > 0.6) & (y < 0.9) & (ax > half - 0.4) & (ax < half - 0.08),
    )
    sign = (k == BUS) & (y > h - 0.4) & (y < h - 0.12) & (ax < half - 0.3)
    cargo = (k == TRUCK) & np.where(front, y > 2.8, y > 1.0)
    wheels = (y < np.where(is_car, 0.3, 0.55)) & (ax > half - 0.45) & (ax < half - 0.06)
    rgb = shade(np.where(cargo[:, None], cargo_rgb[o], paint[o]), y, h, rng, 0.04)
    rgb = np.where(glass[:, None], glass_rgb[o], rgb)
    rgb = np.where((wheels & ~body)[:, None], 0.05, rgb)
    lamp_rgb = np.where(front[:, None], np.array([0.92, 0.92, 0.85]), np.array([0.75, 0.08, 0.06]))
    rgb = np.where(lights[:, None], lamp_rgb, np.where(sign[:, None], np.array([0.15, 0.12, 0.05]), rgb))
    # headlights are far brighter than tail lights; parked cars are dark
    lamp_emit = np.where(front[:, None], np.array([4.0, 4.0, 3.6]), np.array([1.5, 0.06, 0.03]))
    emit = np.where((lights & (p["on"][o] > 0))[:, None], lamp_emit, 0.0)
    emit = np.where(sign[:, None], np.array([1.2, 0.7, 0.1]), emit)
    roof = np.where(is_car, cab & (y > 0.93 * h), y > h - 0.1)
    up = np.where(roof, 1.0, np.where(is_car & ~cab & (y > 0.52 * h) & (y < 0.6 * h), 0.6, 0.0))
    cv.splat(px, body | wheels, p["z"][o], k, rgb, inst[o], up, emit)


def _draw_persons(cv: Canvas, rng: np.random.Generator, p: dict[str, np.ndarray]) -> None:
    """Pedestrians: head (skin, hair), torso with arms, legs."""
    n = len(p["u"])
    height = rng.uniform(1.55, 1.92, n)
    shirt, trousers = palette_colours(rng, CLOTHES, n, 0.1), palette_colours(rng, CLOTHES, n, 0.1) * 0.8
    skin, hair = palette_colours(rng, SKIN, n, 0.05), palette_colours(rng, CLOTHES[:5], n, 0.1) * 0.6
    inst = cv.new_instances(np.full(n, PERSON))
    px = cv.boxes(p["u"], p["z"], -0.3, 0.3, 0.0, height)
    o, y, ax = px.obj, px.y, np.abs(px.x)
    h = height[o]
    head = (ax / 0.12) ** 2 + ((y - (h - 0.13)) / 0.14) ** 2 < 1
    torso = (y >= 0.5 * h) & (y < h - 0.24) & (ax < 0.17 + 0.1 * (y > 0.6 * h))
    legs = (y < 0.5 * h) & (ax < 0.17) & ~((ax < 0.035) & (y < 0.45 * h))
    rgb = np.where(legs[:, None], trousers[o], shirt[o])
    rgb = np.where(head[:, None], np.where((y > h - 0.08)[:, None], hair[o], skin[o]), rgb)
    cv.splat(px, head | torso | legs, p["z"][o], PERSON, shade(rgb, y, h, rng, 0.05), inst[o])


def _draw_bikes(cv: Canvas, rng: np.random.Generator, p: dict[str, np.ndarray]) -> None:
    """Bicycles and motorcycles from behind or in profile (crossing), and their riders."""
    n = len(p["u"])
    motor, side = p["motor"] > 0, p["side"] > 0
    cls = np.where(motor, MOTORCYCLE, BICYCLE)
    frame = np.where(
        motor[:, None], palette_colours(rng, CAR_COLOURS, n, 0.1), palette_colours(rng, CLOTHES, n, 0.1)
    )
    inst = cv.new_instances(cls)
    length = np.where(motor, 1.0, 0.9)
    half = np.where(side, length, 0.35)
    px = cv.boxes(p["u"], p["z"], -half, half, 0.0, 1.1)
    o, x, y = px.obj, px.x, px.y
    ax, r = np.abs(x), 0.34
    profile = side[o]
    wheel_side = (ax - (length[o] - r)) ** 2 + (y - r) ** 2 < r * r
    frame_side = ((x > -0.55) & (x < 0.45) & (y > 0.45) & (y < np.where(motor[o], 0.85, 0.6))) | (
        (np.abs(x + 0.15) < 0.06) & (y > 0.34) & (y < 0.9)
    )
    wheel_back = thin(x, 0.05, px.pixel) & (y < 0.7)
    frame_back = ((y > 0.95) & (y < 1.05) & (ax < 0.3)) | (motor[o] & (ax < 0.32) & (y > 0.3) & (y < 0.85))
    wheel = np.where(profile, wheel_side & ~frame_side, wheel_back)
    mask = np.where(profile, wheel_side | frame_side, wheel_back | frame_back)
    rgb = shade(np.where(wheel[:, None], 0.06, frame[o]), y, 1.1, rng, 0.05)
    cv.splat(px, mask, p["z"][o], cls[o], rgb, inst[o])
    riders = np.flatnonzero(p["rider"] > 0)
    if riders.size == 0:
        return
    m = riders.size
    shirt, trousers = palette_colours(rng, CLOTHES, m, 0.1), palette_colours(rng, CLOTHES, m, 0.1) * 0.8
    helmet = np.where(
        motor[riders, None], palette_colours(rng, CAR_COLOURS, m, 0.05), palette_colours(rng, SKIN, m, 0.05)
    )
    inst = cv.new_instances(np.full(m, RIDER))
    z = p["z"][riders] - 0.05  # the rider is drawn over the machine
    px = cv.boxes(p["u"][riders], z, -0.45, 0.45, 0.35, 1.75)
    o, x, y = px.obj, px.x, px.y
    profile = side[riders][o]
    lean = np.where(profile, 0.15, 0.0)
    head = ((x - lean) / 0.12) ** 2 + ((y - 1.62) / 0.13) ** 2 < 1
    torso = (y > 1.0) & (y < 1.5) & (np.abs(x - lean * (y - 1.0) / 0.5) < 0.2)
    legs = (y <= 1.0) & (np.abs(x) < np.where(profile, 0.15, 0.2)) & (profile | (np.abs(x) >= 0.04))
    arms = profile & (x > 0.0) & (x < 0.45) & (y > 1.15) & (y < 1.3)
    rgb = np.where(head[:, None], helmet[o], np.where(legs[:, None], trousers[o], shirt[o]))
    cv.splat(px, head | torso | legs | arms, z[o], RIDER, shade(rgb, y, 1.75, rng, 0.05), inst[o])


def _draw_lamps(
    cv: Canvas, rng: np.random.Generator, p: dict[str, np.ndarray], light: np.ndarray
) -> np.ndarray:
    """Street lamps: pole, arm over the road and a lamp head that shines at night.

    Returns:
        (N, 3) positions (u, height, z) of the lamp heads.
    """
    n = len(p["u"])
    top, arm = rng.uniform(6.0, 9.0, n), rng.uniform(0.8, 1.8, n)
    head = p["towards"] * arm  # lateral offset of the head from the pole
    grey = palette_colours(rng, np.array([(0.45, 0.46, 0.48)]), n, 0.1)
    inst = cv.new_instances(np.full(n, POLE))
    px = cv.boxes(p["u"], p["z"], np.minimum(head, 0) - 0.3, np.maximum(head, 0) + 0.3, 0.0, top)
    o, x, y = px.obj, px.x, px.y
    t, hd = top[o], head[o]
    pole = thin(x, 0.09, px.pixel)
    arm_mask = (np.abs(x - 0.5 * hd) <= 0.5 * np.abs(hd)) & thin(y - (t - 0.06), 0.06, px.pixel)
    lamp = (np.abs(x - hd) < 0.3) & (y > t - 0.35) & (y < t - 0.05)
    rgb = np.where(lamp[:, None], np.array([0.85, 0.85, 0.80]), grey[o] * (0.85 + 0.15 * y / t)[:, None])
    emit = np.where(lamp[:, None], light * 5.0, 0.0)
    cv.splat(px, pole | arm_mask | lamp, p["z"][o], POLE, rgb, inst[o], 0.0, emit)
    return np.stack([p["u"] + head, top - 0.3, p["z"]], axis=1)


def _draw_signs(cv: Canvas, rng: np.random.Generator, p: dict[str, np.ndarray]) -> None:
    """Traffic signs on their own poles: round, triangular, rectangular or diamond faces."""
    n = len(p["u"])
    top, size, shape = rng.uniform(2.0, 2.6, n), rng.uniform(0.3, 0.42, n), rng.integers(4, size=n)
    red, white, blue = (
        np.array([0.80, 0.10, 0.10]),
        np.array([0.93, 0.93, 0.90]),
        np.array([0.10, 0.30, 0.75]),
    )
    mandatory = rng.random(n) < 0.4  # blue discs rather than red-ringed ones
    panel = palette_colours(rng, np.array([(0.10, 0.30, 0.75), (0.10, 0.45, 0.25), (0.92, 0.92, 0.92)]), n)
    pole_inst, face_inst = cv.new_instances(np.full(n, POLE)), cv.new_instances(np.full(n, TRAFFIC_SIGN))
    px = cv.boxes(p["u"], p["z"], -size, size, 0.0, top + 2 * size)
    o, x, y = px.obj, px.x, px.y
    s, kind = size[o], shape[o]
    dy = y - (top[o] + s)
    r = np.hypot(x, dy) / s
    tri = (dy > -0.8 * s) & (np.abs(x) < (s - dy) * 0.62)
    tri_border = (dy < -0.6 * s) | (np.abs(x) > (s - dy) * 0.62 - 0.08)
    diamond = np.abs(x) + np.abs(dy)
    face = np.select(
        [kind == 0, kind == 1, kind == 2], [r < 1, tri, (np.abs(x) < s) & (np.abs(dy) < 0.7 * s)], diamond < s
    )
    face &= y > top[o]
    disc = np.where(mandatory[o, None], blue, np.where((r > 0.7)[:, None], red, white))
    rgb = np.select(
        [(kind == 0)[:, None], (kind == 1)[:, None], (kind == 2)[:, None]],
        [disc, np.where(tri_border[:, None], red, white), panel[o]],
        np.where((diamond > 0.7 * s)[:, None], white, np.array([0.95, 0.78, 0.10])),
    )
    pole = thin(x, 0.05, px.pixel) & ~face
    rgb = np.where(pole[:, None], np.array([0.5, 0.5, 0.52]), rgb)
    cls = np.where(face, TRAFFIC_SIGN, POLE)
    cv.splat(px, face | pole, p["z"][o], cls, rgb, np.where(face, face_inst[o], pole_inst[o]))


def _draw_traffic_lights(cv: Canvas, rng: np.random.Generator, p: dict[str, np.ndarray]) -> None:
    """Poles with a three-lamp housing beside the kerb or hung over the road on an arm."""
    n = len(p["u"])
    over = p["over"] > 0
    bottom = np.where(over, 5.0, rng.uniform(2.3, 3.0, n))
    housing = p["housing"] - p["u"]  # lateral offset of the housing from the pole
    pole_inst, light_inst = cv.new_instances(np.full(n, POLE)), cv.new_instances(np.full(n, TRAFFIC_LIGHT))
    px = cv.boxes(
        p["u"], p["z"], np.minimum(housing, 0) - 0.2, np.maximum(housing, 0) + 0.2, 0.0, bottom + 1.0
    )
    o, x, y = px.obj, px.x, px.y
    b, hx = bottom[o], housing[o]
    box = (np.abs(x - hx) < 0.18) & (y > b) & (y < b + 0.95)
    pole = thin(x, 0.08, px.pixel)
    arm = over[o] & (np.abs(x - 0.5 * hx) <= 0.5 * np.abs(hx)) & thin(y - (b + 0.95), 0.05, px.pixel)
    pole = (pole | arm) & ~box
    colours = np.array([(0.95, 0.10, 0.05), (0.95, 0.65, 0.05), (0.10, 0.90, 0.35)])  # red / amber / green
    which = np.argmin(
        np.abs((y - b)[:, None] - np.array([0.78, 0.475, 0.17])[None, :]), axis=1
    )  # nearest lamp
    centre = b + np.array([0.78, 0.475, 0.17])[which]
    lamp = box & (((x - hx) / 0.11) ** 2 + ((y - centre) / 0.11) ** 2 < 1)
    active = which == p["state"][o].astype(int)
    rgb = np.where(
        lamp[:, None], colours[which] * np.where(active, 1.0, 0.2)[:, None], np.array([0.10, 0.10, 0.11])
    )
    rgb = np.where(pole[:, None], np.array([0.45, 0.46, 0.48]), rgb)
    emit = np.where((lamp & active)[:, None], colours[which] * 2.0, 0.0)
    cls = np.where(box, TRAFFIC_LIGHT, POLE)
    cv.splat(px, box | pole, p["z"][o], cls, rgb, np.where(box, light_inst[o], pole_inst[o]), 0.0, emit)


def _draw_trees(cv: Canvas, rng: np.random.Generator, p: dict[str, np.ndarray]) -> None:
    """Trunks with lumpy crowns; the crowns' upper parts face up (snow)."""
    n = len(p["u"])
    trunk, r = rng.uniform(1.8, 3.2, n), rng.uniform(1.4, 3.0, n)
    ry = r * rng.uniform(0.9, 1.3, n)
    phase = rng.uniform(0, 2 * np.pi, (n, 2))
    green, bark = (
        palette_colours(rng, GREENS, n, 0.12),
        palette_colours(rng, np.array([(0.30, 0.22, 0.15)]), n, 0.15),
    )
    inst = cv.new_instances(np.full(n, VEGETATION))
    cy = trunk + ry
    px = cv.boxes(p["u"], p["z"], -1.17 * r, 1.17 * r, 0.0, cy + 1.17 * ry)
    o = px.obj
    x, dy = px.x / r[o], (px.y - cy[o]) / ry[o]
    angle = np.arctan2(dy, x)
    edge = 1 + 0.1 * np.sin(3 * angle + phase[o, 0]) + 0.07 * np.sin(7 * angle + phase[o, 1])
    crown = x * x + dy * dy < edge * edge
    stem = thin(px.x, 0.14, px.pixel) & (px.y < cy[o])
    light = 0.75 + 0.35 * np.clip(dy * 0.5 + 0.5, 0, 1)
    leaves = green[o] * (light * (1 + 0.22 * rng.standard_normal(o.size)))[:, None]
    rgb = np.minimum(np.maximum(np.where(crown[:, None], leaves, bark[o]), 0), 1)
    up = np.where(crown & (dy > 0.2), 0.6, 0.0)
    cv.splat(px, crown | stem, p["z"][o], VEGETATION, rgb, inst[o], up)


def draw_things(cv: Canvas, rng: np.random.Generator, street: Street) -> np.ndarray:
    """Place and draw every object; returns the street lamps as (L, 6) rows (u, height, z, r, g, b power)."""
    placed = _place(rng, street, cv.cam)
    light = LAMP_LIGHT[rng.integers(len(LAMP_LIGHT))] * rng.uniform(3.0, 6.0)
    lamps = np.zeros((0, 6))
    if placed["lamps"]:
        heads = _draw_lamps(cv, rng, placed["lamps"], light / np.max(light))
        lamps = np.concatenate([heads, np.broadcast_to(light, (len(heads), 3))], axis=1)
    for kind, draw in (
        ("trees", _draw_trees),
        ("persons", _draw_persons),
        ("vehicles", _draw_vehicles),
        ("bikes", _draw_bikes),
        ("signs", _draw_signs),
        ("lights", _draw_traffic_lights),
    ):
        if placed[kind]:
            draw(cv, rng, placed[kind])
    cv.resolve()
    return lamps
