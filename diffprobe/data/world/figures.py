"""Figures in their own local frame: convex primitives tagged with a part and a colour role, plus keypoints.

Local units: a figure spans roughly [-1.5, 1.5] on each axis, y pointing down (image convention).
The scene maps local points to pixels with an affine pose; masks are tested at pixel centres in
local coordinates, so keypoints placed strictly inside a primitive stay inside the drawn part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffprobe.data.world.vocab import KEYPOINTS


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return ((u - self.cx) / self.rx) ** 2 + ((v - self.cy) / self.ry) ** 2 <= 1.0


@dataclass(frozen=True)
class Polygon:
    """A convex polygon, vertices in either winding order."""

    points: tuple[tuple[float, float], ...]

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        pts = np.asarray(self.points, dtype=np.float64)
        nxt = np.roll(pts, -1, axis=0)
        cross = [(b[0] - a[0]) * (v - a[1]) - (b[1] - a[1]) * (u - a[0]) for a, b in zip(pts, nxt)]
        cross = np.stack(cross)
        return np.all(cross >= 0, axis=0) | np.all(cross <= 0, axis=0)


@dataclass(frozen=True)
class Segment:
    """A thick line segment (capsule) of radius r."""

    x0: float
    y0: float
    x1: float
    y1: float
    r: float

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        dx, dy = self.x1 - self.x0, self.y1 - self.y0
        t = np.clip(((u - self.x0) * dx + (v - self.y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        return (u - self.x0 - t * dx) ** 2 + (v - self.y0 - t * dy) ** 2 <= self.r**2


@dataclass(frozen=True)
class Piece:
    part: str
    shape: Ellipse | Polygon | Segment
    role: str  # "main" (named colour + texture), "shade" (darker main), "dark"/"light" (contrast), "accent"
    accent: tuple[int, int, int] | None = None


@dataclass
class Figure:
    """Pieces in painting order, keypoints in local coordinates, and keypoints hidden by the figure itself."""

    category: str
    pieces: list[Piece]
    extent: tuple[float, float, float, float]  # local bounding box (x0, y0, x1, y1)
    keypoints: dict[str, tuple[float, float]] = field(default_factory=dict)
    self_hidden: frozenset[str] = frozenset()


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return Polygon(((x0, y0), (x1, y0), (x1, y1), (x0, y1)))


def face(rng: np.random.Generator) -> Figure:
    w = rng.uniform(0.85, 1.05)
    eye_dx, eye_y, mouth_y = rng.uniform(0.32, 0.42), rng.uniform(-0.32, -0.18), rng.uniform(0.5, 0.62)
    mouth_w = rng.uniform(0.34, 0.44)
    pieces = [
        Piece("head", Ellipse(0.0, 0.0, w, 1.25), "main"),
        Piece("eye", Ellipse(-eye_dx, eye_y, 0.19, 0.15), "dark"),
        Piece("eye", Ellipse(eye_dx, eye_y, 0.19, 0.15), "dark"),
        Piece("nose", Polygon(((0.0, -0.12), (-0.15, 0.22), (0.15, 0.22))), "shade"),
        Piece("mouth", Ellipse(0.0, mouth_y, mouth_w, 0.15), "dark"),
    ]
    kps = {"left_eye": (-eye_dx, eye_y), "right_eye": (eye_dx, eye_y), "nose": (0.0, 0.1),
           "mouth_left": (-0.72 * mouth_w, mouth_y), "mouth_right": (0.72 * mouth_w, mouth_y)}
    return Figure("face", pieces, (-w, -1.25, w, 1.25), kps)


def bird(rng: np.random.Generator, flipped: bool) -> Figure:
    """A side-view bird facing +x (before the pose's mirror); the far eye and wing are self-hidden.

    Facing image-right the viewer sees the bird's right side, so unflipped the near eye is "right_eye".
    """
    hx, hy = rng.uniform(0.85, 1.0), rng.uniform(-0.65, -0.5)
    leg_len = rng.uniform(0.9, 1.05)
    pieces = [
        Piece("tail", Polygon(((-0.7, -0.15), (-1.5, -0.45), (-1.5, 0.2))), "shade"),
        Piece("leg", Segment(-0.2, 0.45, -0.25, leg_len, 0.09), "accent", (230, 150, 30)),
        Piece("leg", Segment(0.2, 0.45, 0.25, leg_len, 0.09), "accent", (230, 150, 30)),
        Piece("body", Ellipse(0.0, 0.0, 1.0, 0.6), "main"),
        Piece("head", Ellipse(hx, hy, 0.42, 0.4), "main"),
        Piece("beak", Polygon(((hx + 0.33, hy - 0.14), (hx + 0.33, hy + 0.12), (hx + 0.8, hy)))
              , "accent", (235, 165, 20)),
        Piece("eye", Ellipse(hx + 0.1, hy - 0.06, 0.1, 0.1), "dark"),
        Piece("wing", Ellipse(-0.12, -0.05, 0.62, 0.3), "shade"),
    ]
    eye = (hx + 0.1, hy - 0.06)
    wing = (-0.12, -0.05)
    kps = {
        "back": (-0.1, -0.45), "beak": (hx + 0.5, hy), "belly": (0.0, 0.45), "breast": (0.55, 0.25),
        "crown": (hx - 0.05, hy - 0.28), "forehead": (hx + 0.25, hy - 0.22), "left_eye": eye,
        "left_leg": (-0.23, 0.8 * leg_len), "left_wing": wing, "nape": (hx - 0.32, hy + 0.1),
        "right_eye": eye, "right_leg": (0.23, 0.8 * leg_len), "right_wing": wing, "tail": (-1.25, -0.12),
        "throat": (hx + 0.12, hy + 0.3),
    }
    far = "right" if flipped else "left"
    return Figure("bird", pieces, (-1.5, -1.1, hx + 0.8, leg_len + 0.1), kps, frozenset({f"{far}_eye", f"{far}_wing"}))


def house(rng: np.random.Generator) -> Figure:
    door_w, win_y = rng.uniform(0.18, 0.26), rng.uniform(0.0, 0.15)
    glass = (250, 235, 140) if rng.random() < 0.5 else (170, 210, 240)
    pieces = [
        Piece("wall", _rect(-1.0, -0.2, 1.0, 1.2), "main"),
        Piece("roof", Polygon(((-1.2, -0.2), (1.2, -0.2), (0.0, -1.2))), "dark"),
        Piece("door", _rect(-door_w, 0.5, door_w, 1.2), "shade"),
        Piece("window", _rect(-0.8, win_y, -0.32, win_y + 0.36), "accent", glass),
        Piece("window", _rect(0.32, win_y, 0.8, win_y + 0.36), "accent", glass),
    ]
    kps = {"roof_apex": (0.0, -0.92), "roof_left": (-0.95, -0.3), "roof_right": (0.95, -0.3),
           "window_left": (-0.56, win_y + 0.18), "window_right": (0.56, win_y + 0.18), "door": (0.0, 0.85),
           "base_left": (-0.85, 1.08), "base_right": (0.85, 1.08)}
    return Figure("house", pieces, (-1.2, -1.2, 1.2, 1.2), kps)


def shape(category: str) -> Figure:
    body = {"circle": Ellipse(0.0, 0.0, 1.0, 1.0), "square": _rect(-0.9, -0.9, 0.9, 0.9),
            "triangle": Polygon(((0.0, -1.15), (-1.1, 0.75), (1.1, 0.75)))}[category]
    return Figure(category, [Piece("body", body, "main")], (-1.1, -1.15, 1.1, 1.0))


def build(category: str, rng: np.random.Generator, flipped: bool = False) -> Figure:
    """The figure of `category` with random proportions drawn from `rng`."""
    if category == "face":
        fig = face(rng)
    elif category == "bird":
        fig = bird(rng, flipped)
    elif category == "house":
        fig = house(rng)
    else:
        fig = shape(category)
    assert tuple(fig.keypoints) == KEYPOINTS.get(category, ()), category
    return fig
