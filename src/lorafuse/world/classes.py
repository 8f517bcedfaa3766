"""The world's object classes. Each class draws an individual from its traits as a list of coloured parts.

An *individual* is one fixed set of traits (discrete part variants, proportions, a marking, colours), so
"this particular teapot" differs from "a teapot" in shape as well as colour: identity must survive styles
that drop colour (ink, blueprint). Parts are drawn in order; later parts cover earlier ones.
Colour roles: primary, secondary, accent, dark, light (the individual's palette resolves them).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lorafuse.world import primitives as P

Part = tuple[np.ndarray, str]  # (mask, colour role)
Traits = dict[str, float]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _k(rng: np.random.Generator, n: int) -> int:
    return int(rng.integers(n))


# ---------------------------------------------------------------- teapot
def teapot_traits(rng):
    return {"w": _u(rng, 0.45, 0.62), "h": _u(rng, 0.3, 0.45), "spout": _k(rng, 3), "handle": _k(rng, 2),
            "knob": _k(rng, 3), "mark": _k(rng, 3), "lid_h": _u(rng, 0.08, 0.18)}


def teapot_draw(g, t):
    w, h = t["w"], t["h"]
    parts: list[Part] = []
    if t["handle"] == 0:
        parts.append((P.ring(g, -w - 0.02, 0.05, 0.28, 0.17), "secondary"))
    else:
        parts.append((P.rect(g, -w - 0.06, 0.05, 0.18, 0.42, 0.5) & ~P.rect(g, -w - 0.06, 0.05, 0.07, 0.26), "secondary"))
    spout_end = [(w + 0.35, -0.3), (w + 0.28, -0.05), (w + 0.4, -0.45)][int(t["spout"])]
    parts.append((P.capsule(g, (w - 0.1, 0.12), spout_end, 0.07), "primary"))
    parts.append((P.ellipse(g, 0, 0.1, w, h), "primary"))
    lid_y = 0.1 - h
    parts.append((P.ellipse(g, 0, lid_y + 0.02, w * 0.55, t["lid_h"]), "secondary"))
    if t["knob"] == 0:
        parts.append((P.ellipse(g, 0, lid_y - t["lid_h"] - 0.02, 0.07, 0.07), "accent"))
    elif t["knob"] == 1:
        parts.append((P.rect(g, 0, lid_y - t["lid_h"], 0.2, 0.07), "accent"))
    if t["mark"] == 0:
        parts.append((P.rect(g, 0, 0.1, 2 * w, 0.1) & P.ellipse(g, 0, 0.1, w, h), "accent"))
    elif t["mark"] == 1:
        parts.append((P.star(g, 0.05, 0.12, 0.14), "accent"))
    else:
        parts.append((P.ellipse(g, -0.15, 0.15, 0.09, 0.09) | P.ellipse(g, 0.15, 0.15, 0.09, 0.09), "accent"))
    return parts


# ---------------------------------------------------------------- mug
def mug_traits(rng):
    return {"w": _u(rng, 0.55, 0.8), "h": _u(rng, 0.7, 1.05), "handle": _k(rng, 3), "rim": _k(rng, 2),
            "mark": _k(rng, 3)}


def mug_draw(g, t):
    w, h = t["w"], t["h"]
    parts: list[Part] = []
    hx = w / 2 + 0.08
    r_out = [0.25, 0.33, 0.2][int(t["handle"])]
    parts.append((P.ring(g, hx, 0.0, r_out, r_out - 0.09), "secondary"))
    parts.append((P.rect(g, 0, 0.05, w, h, 0.25), "primary"))
    if t["rim"] == 0:
        parts.append((P.rect(g, 0, 0.05 - h / 2 + 0.06, w, 0.12, 0.3), "secondary"))
    else:
        parts.append((P.rect(g, 0, 0.05 + h / 2 - 0.06, w, 0.12, 0.3), "secondary"))
    if t["mark"] == 0:
        heart = P.ellipse(g, -0.08, 0.0, 0.1, 0.1) | P.ellipse(g, 0.08, 0.0, 0.1, 0.1)
        heart |= P.triangle(g, (-0.18, 0.03), (0.18, 0.03), (0, 0.24))
        parts.append((heart, "accent"))
    elif t["mark"] == 1:
        parts.append((P.diamond(g, 0, 0.08, 0.16), "accent"))
    else:
        parts.append((P.rect(g, 0, 0.1, w, 0.08) | P.rect(g, 0, 0.25, w, 0.08), "accent"))
    return parts


# ---------------------------------------------------------------- robot
def robot_traits(rng):
    return {"head_w": _u(rng, 0.35, 0.6), "body_w": _u(rng, 0.5, 0.8), "antenna": _k(rng, 3), "eyes": _k(rng, 2),
            "arms": _k(rng, 2), "panel": _k(rng, 2)}


def robot_draw(g, t):
    hw, bw = t["head_w"], t["body_w"]
    parts: list[Part] = []
    parts.append((P.rect(g, -0.18, 0.72, 0.14, 0.3) | P.rect(g, 0.18, 0.72, 0.14, 0.3), "dark"))
    arm_y = 0.05 if t["arms"] == 0 else -0.25
    parts.append((P.capsule(g, (-bw / 2, 0.1), (-bw / 2 - 0.22, arm_y + 0.2), 0.06), "secondary"))
    parts.append((P.capsule(g, (bw / 2, 0.1), (bw / 2 + 0.22, arm_y + 0.2), 0.06), "secondary"))
    parts.append((P.rect(g, 0, 0.28, bw, 0.62, 0.15), "primary"))
    parts.append((P.rect(g, 0, -0.3, hw, 0.42, 0.2), "primary"))
    if t["antenna"] >= 1:
        parts.append((P.capsule(g, (0, -0.5), (0, -0.72), 0.025) | P.ellipse(g, 0, -0.75, 0.06, 0.06), "accent"))
    if t["antenna"] == 2:
        parts.append((P.capsule(g, (-hw / 2 + 0.05, -0.5), (-hw / 2 - 0.08, -0.7), 0.025), "accent"))
    if t["eyes"] == 0:
        parts.append((P.ellipse(g, -0.1, -0.32, 0.06, 0.06) | P.ellipse(g, 0.1, -0.32, 0.06, 0.06), "light"))
    else:
        parts.append((P.rect(g, 0, -0.32, hw * 0.75, 0.1, 0.5), "light"))
    if t["panel"] == 0:
        parts.append((P.rect(g, 0, 0.25, bw * 0.5, 0.25, 0.2), "secondary"))
    else:
        parts.append((P.ellipse(g, -0.1, 0.25, 0.06, 0.06) | P.ellipse(g, 0.1, 0.25, 0.06, 0.06), "accent"))
    return parts


# ---------------------------------------------------------------- car
def car_traits(rng):
    return {"len": _u(rng, 1.2, 1.6), "cabin": _k(rng, 3), "wheel": _u(rng, 0.14, 0.22), "stripe": _k(rng, 2),
            "spoiler": _k(rng, 2)}


def car_draw(g, t):
    L, r = t["len"], t["wheel"]
    parts: list[Part] = []
    if t["cabin"] == 0:
        parts.append((P.trapezoid(g, 0, -0.12, L * 0.4, L * 0.6, 0.3), "secondary"))
    elif t["cabin"] == 1:
        parts.append((P.ellipse(g, -0.05, -0.05, L * 0.3, 0.3), "secondary"))
    else:
        parts.append((P.rect(g, -0.15, -0.15, L * 0.45, 0.32, 0.1), "secondary"))
    parts.append((P.rect(g, 0, 0.15, L, 0.34, 0.35), "primary"))
    if t["spoiler"]:
        parts.append((P.rect(g, -L / 2 + 0.06, -0.07, 0.12, 0.18), "accent"))
    parts.append((P.rect(g, -0.05, -0.12, L * 0.22, 0.14, 0.2), "light"))
    if t["stripe"] == 0:
        parts.append((P.rect(g, 0, 0.15, L * 0.95, 0.07), "accent"))
    else:
        parts.append((P.ellipse(g, 0.05, 0.15, 0.1, 0.1), "accent"))
    for wx in (-L / 2 + 0.3, L / 2 - 0.3):
        parts.append((P.ellipse(g, wx, 0.33, r, r), "dark"))
    return parts


# ---------------------------------------------------------------- house
def house_traits(rng):
    return {"w": _u(rng, 0.8, 1.2), "roof_h": _u(rng, 0.35, 0.7), "door": _k(rng, 3), "windows": _k(rng, 3),
            "chimney": _k(rng, 2)}


def house_draw(g, t):
    w, rh = t["w"], t["roof_h"]
    parts: list[Part] = []
    if t["chimney"]:
        parts.append((P.rect(g, w * 0.28, -0.1 - rh * 0.55, 0.13, rh * 0.6), "dark"))
    parts.append((P.triangle(g, (-w / 2 - 0.1, -0.1), (w / 2 + 0.1, -0.1), (0, -0.1 - rh)), "secondary"))
    parts.append((P.rect(g, 0, 0.3, w, 0.8), "primary"))
    dx = [0.0, -w * 0.25, w * 0.25][int(t["door"])]
    parts.append((P.rect(g, dx, 0.5, 0.2, 0.4, 0.2), "dark"))
    nwin = int(t["windows"]) + 1
    for k in range(nwin):
        wx = -w / 2 + (k + 1) * w / (nwin + 1)
        if abs(wx - dx) > 0.15:
            parts.append((P.rect(g, wx, 0.12, 0.16, 0.16), "light"))
    parts.append((P.rect(g, 0, -0.05, w * 0.6, 0.05), "accent"))
    return parts


# ---------------------------------------------------------------- tree
def tree_traits(rng):
    return {"crown": _k(rng, 3), "trunk_w": _u(rng, 0.12, 0.25), "size": _u(rng, 0.45, 0.65), "fruit": _k(rng, 3)}


def tree_draw(g, t):
    s = t["size"]
    parts: list[Part] = [(P.rect(g, 0, 0.55, t["trunk_w"], 0.7), "dark")]
    if t["crown"] == 0:
        parts.append((P.ellipse(g, 0, -0.15, s, s * 0.95), "primary"))
    elif t["crown"] == 1:
        parts.append((P.triangle(g, (-s, 0.3), (s, 0.3), (0, -0.85)), "primary"))
    else:
        blobs = P.ellipse(g, -s * 0.45, -0.05, s * 0.55, s * 0.5) | P.ellipse(g, s * 0.45, -0.05, s * 0.55, s * 0.5)
        blobs |= P.ellipse(g, 0, -0.4, s * 0.6, s * 0.5)
        parts.append((blobs, "primary"))
    n = [0, 3, 5][int(t["fruit"])]
    fruit = np.zeros_like(g[0], dtype=bool)
    for k in range(n):
        a = 2 * np.pi * k / max(n, 1) + 0.4
        fruit |= P.ellipse(g, 0.35 * s * np.cos(a), -0.15 + 0.35 * s * np.sin(a), 0.07, 0.07)
    if n:
        parts.append((fruit, "accent"))
    return parts


# ---------------------------------------------------------------- fish
def fish_traits(rng):
    return {"len": _u(rng, 0.6, 0.8), "h": _u(rng, 0.3, 0.45), "tail": _k(rng, 2), "fin": _k(rng, 2),
            "stripes": _k(rng, 3)}


def fish_draw(g, t):
    L, h = t["len"], t["h"]
    parts: list[Part] = []
    if t["tail"] == 0:
        parts.append((P.triangle(g, (-L + 0.1, 0), (-L - 0.35, -0.3), (-L - 0.35, 0.3)), "secondary"))
    else:
        tail = P.triangle(g, (-L + 0.1, 0), (-L - 0.35, -0.4), (-L - 0.15, 0))
        tail |= P.triangle(g, (-L + 0.1, 0), (-L - 0.35, 0.4), (-L - 0.15, 0))
        parts.append((tail, "secondary"))
    if t["fin"] == 0:
        parts.append((P.triangle(g, (-0.2, -h + 0.05), (0.2, -h + 0.05), (-0.1, -h - 0.25)), "secondary"))
    else:
        parts.append((P.ellipse(g, 0, -h, 0.3, 0.12), "secondary"))
    body = P.ellipse(g, 0, 0, L, h)
    parts.append((body, "primary"))
    ns = int(t["stripes"])
    if ns:
        stripes = np.zeros_like(body)
        for k in range(ns + 1):
            stripes |= P.rect(g, -0.3 + k * 0.25, 0, 0.08, 2 * h)
        parts.append((stripes & body, "accent"))
    parts.append((P.ellipse(g, L * 0.6, -h * 0.2, 0.07, 0.07), "dark"))
    return parts


# ---------------------------------------------------------------- bird
def bird_traits(rng):
    return {"body": _u(rng, 0.4, 0.55), "head": _u(rng, 0.2, 0.28), "crest": _k(rng, 2), "tail": _k(rng, 2),
            "beak": _u(rng, 0.12, 0.25)}


def bird_draw(g, t):
    b, hr = t["body"], t["head"]
    parts: list[Part] = [(P.capsule(g, (-0.1, b * 0.8), (-0.1, b + 0.35), 0.03)
                          | P.capsule(g, (0.1, b * 0.8), (0.1, b + 0.35), 0.03), "dark")]
    if t["tail"] == 0:
        parts.append((P.triangle(g, (-b + 0.1, 0.0), (-b - 0.4, -0.25), (-b - 0.4, 0.15)), "secondary"))
    else:
        parts.append((P.rect(g, -b - 0.15, 0.05, 0.4, 0.12, 0.5), "secondary"))
    parts.append((P.ellipse(g, 0, 0.1, b, b * 0.75), "primary"))
    hx, hy = b * 0.65, -b * 0.55
    if t["crest"]:
        parts.append((P.triangle(g, (hx - 0.1, hy - hr + 0.05), (hx + 0.05, hy - hr + 0.05), (hx - 0.1, hy - hr - 0.2)), "accent"))
    parts.append((P.ellipse(g, hx, hy, hr, hr), "primary"))
    parts.append((P.triangle(g, (hx + hr - 0.03, hy - 0.06), (hx + hr - 0.03, hy + 0.06), (hx + hr + t["beak"], hy)), "accent"))
    parts.append((P.ellipse(g, -0.05, 0.1, b * 0.55, b * 0.35), "secondary"))
    parts.append((P.ellipse(g, hx + 0.06, hy - 0.04, 0.05, 0.05), "dark"))
    return parts


# ---------------------------------------------------------------- rocket
def rocket_traits(rng):
    return {"w": _u(rng, 0.28, 0.4), "h": _u(rng, 0.9, 1.2), "fins": _k(rng, 2), "windows": _k(rng, 2),
            "flame": _k(rng, 2)}


def rocket_draw(g, t):
    w, h = t["w"], t["h"]
    top, bottom = -h / 2, h / 2
    parts: list[Part] = []
    if t["flame"]:
        parts.append((P.triangle(g, (-w * 0.35, bottom), (w * 0.35, bottom), (0, bottom + 0.3)), "accent"))
    if t["fins"] == 0:
        parts.append((P.triangle(g, (-w / 2, bottom - 0.35), (-w / 2, bottom), (-w / 2 - 0.25, bottom + 0.05)), "secondary"))
        parts.append((P.triangle(g, (w / 2, bottom - 0.35), (w / 2, bottom), (w / 2 + 0.25, bottom + 0.05)), "secondary"))
    else:
        parts.append((P.rect(g, 0, bottom - 0.08, w + 0.4, 0.16, 0.4), "secondary"))
    parts.append((P.rect(g, 0, 0.1, w, h - 0.2), "primary"))
    parts.append((P.triangle(g, (-w / 2, top + 0.2), (w / 2, top + 0.2), (0, top - 0.15)), "secondary"))
    nwin = int(t["windows"]) + 1
    for k in range(nwin):
        parts.append((P.ellipse(g, 0, -0.1 + 0.25 * k, w * 0.3, w * 0.3), "light"))
    return parts


# ---------------------------------------------------------------- lamp
def lamp_traits(rng):
    return {"shade": _k(rng, 3), "pole_h": _u(rng, 0.5, 0.8), "base_w": _u(rng, 0.35, 0.6), "tilt": _u(rng, -0.2, 0.2)}


def lamp_draw(g, t):
    ph = t["pole_h"]
    top = 0.6 - ph
    parts: list[Part] = [(P.ellipse(g, 0, 0.65, t["base_w"], 0.1), "secondary")]
    parts.append((P.capsule(g, (0, 0.62), (t["tilt"], top), 0.04), "dark"))
    sx = t["tilt"]
    if t["shade"] == 0:
        parts.append((P.trapezoid(g, sx, top - 0.12, 0.3, 0.7, 0.45), "primary"))
    elif t["shade"] == 1:
        parts.append((P.ellipse(g, sx, top, 0.4, 0.32) & (g[1] <= top + 0.02), "primary"))
    else:
        parts.append((P.rect(g, sx, top - 0.1, 0.55, 0.4, 0.2), "primary"))
    parts.append((P.rect(g, sx, top + 0.05, 0.45, 0.06), "accent"))
    parts.append((P.ellipse(g, sx, top + 0.14, 0.08, 0.06), "light"))
    return parts


# ---------------------------------------------------------------- flower
def flower_traits(rng):
    return {"petals": [4, 5, 6, 8][_k(rng, 4)], "petal_len": _u(rng, 0.22, 0.34), "leaves": _k(rng, 3),
            "center": _u(rng, 0.1, 0.17)}


def flower_draw(g, t):
    cy = -0.3
    parts: list[Part] = [(P.capsule(g, (0, cy), (0, 0.85), 0.04), "secondary")]
    nl = int(t["leaves"])
    if nl >= 1:
        parts.append((P.ellipse(g, 0.18, 0.45, 0.18, 0.07), "secondary"))
    if nl == 2:
        parts.append((P.ellipse(g, -0.18, 0.3, 0.18, 0.07), "secondary"))
    n, pl = int(t["petals"]), t["petal_len"]
    petals = np.zeros_like(g[0], dtype=bool)
    x, y = g
    for k in range(n):
        a = 2 * np.pi * k / n
        # each petal is an ellipse rotated to angle a around the flower centre
        c, s = np.cos(a), np.sin(a)
        xr, yr = (x) * c + (y - cy) * s, -(x) * s + (y - cy) * c
        petals |= ((xr - pl) / pl) ** 2 + (yr / (pl * 0.45)) ** 2 <= 1
    parts.append((petals, "primary"))
    parts.append((P.ellipse(g, 0, cy, t["center"], t["center"]), "accent"))
    return parts


# ---------------------------------------------------------------- cat (face)
def cat_traits(rng):
    return {"face_w": _u(rng, 0.5, 0.65), "ears": _k(rng, 2), "stripes": _k(rng, 2), "eyes": _k(rng, 2),
            "muzzle": _k(rng, 2)}


def cat_draw(g, t):
    fw = t["face_w"]
    parts: list[Part] = []
    eh = 0.45 if t["ears"] == 0 else 0.3
    for sgn in (-1, 1):
        parts.append((P.triangle(g, (sgn * fw * 0.9, -0.2), (sgn * fw * 0.2, -0.4), (sgn * fw * 0.75, -0.4 - eh)), "secondary"))
    parts.append((P.ellipse(g, 0, 0.05, fw, fw * 0.85), "primary"))
    if t["stripes"]:
        st = P.rect(g, 0, -0.4, 0.06, 0.3) | P.rect(g, -0.15, -0.38, 0.05, 0.22) | P.rect(g, 0.15, -0.38, 0.05, 0.22)
        parts.append((st & P.ellipse(g, 0, 0.05, fw, fw * 0.85), "secondary"))
    if t["muzzle"]:
        parts.append((P.ellipse(g, 0, 0.25, fw * 0.45, 0.17), "light"))
    ey = -0.05
    if t["eyes"] == 0:
        parts.append((P.ellipse(g, -fw * 0.4, ey, 0.09, 0.09) | P.ellipse(g, fw * 0.4, ey, 0.09, 0.09), "accent"))
    else:
        parts.append((P.ellipse(g, -fw * 0.4, ey, 0.12, 0.05) | P.ellipse(g, fw * 0.4, ey, 0.12, 0.05), "accent"))
    parts.append((P.triangle(g, (-0.07, 0.14), (0.07, 0.14), (0, 0.22)), "dark"))
    return parts


ClassSpec = tuple[Callable[[np.random.Generator], Traits], Callable[..., list[Part]]]

CLASSES: dict[str, ClassSpec] = {
    "teapot": (teapot_traits, teapot_draw),
    "mug": (mug_traits, mug_draw),
    "robot": (robot_traits, robot_draw),
    "car": (car_traits, car_draw),
    "house": (house_traits, house_draw),
    "tree": (tree_traits, tree_draw),
    "fish": (fish_traits, fish_draw),
    "bird": (bird_traits, bird_draw),
    "rocket": (rocket_traits, rocket_draw),
    "lamp": (lamp_traits, lamp_draw),
    "flower": (flower_traits, flower_draw),
    "cat": (cat_traits, cat_draw),
}
