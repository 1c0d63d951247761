"""Colours and textures: "stuff" backgrounds and object fills, as float RGB arrays in [0, 255]."""

from __future__ import annotations

import cv2
import numpy as np

from diffprobe.data.world.vocab import COLOURS


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) smooth random field in about [-1, 1] with `cells` features across the image."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).clip(-1.0, 1.0)


def jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def stuff(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) texture of a stuff class covering the whole canvas (the scene masks it)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    n = smooth_noise(rng, h, w, 6)[..., None]
    if name == "sky":
        base = jitter(rng, [(110, 165, 235), (175, 180, 192), (240, 165, 120)][rng.integers(3)], 20)
        img = base * (0.85 + 0.3 * yy[..., None])
        clouds = np.clip((smooth_noise(rng, h, w, 4) - 0.25) * 2.5, 0, 1)[..., None]
        img = img * (1 - clouds) + 245 * clouds
    elif name == "wall":
        base = jitter(rng, [(165, 70, 50), (150, 150, 150), (205, 185, 145)][rng.integers(3)], 20)
        rows = max(4, h // 8)
        row = np.floor(yy * rows)
        offset = (row % 2) * 0.5
        mortar = (np.abs(yy * rows - row - 0.5) > 0.38) | (np.abs(((xx * rows / 2 + offset) % 1) - 0.5) > 0.45)
        img = base * (1 + 0.1 * n)
        img[mortar] = jitter(rng, (210, 205, 195), 15)
    elif name == "grass":
        base = jitter(rng, (70, 150, 50), 30)
        blades = smooth_noise(rng, 2 * h, w, w // 2)[: h][..., None]
        img = base * (1 + 0.15 * n + 0.2 * blades)
    elif name == "water":
        base = jitter(rng, (40, 105, 180), 25)
        waves = np.sin(yy * h * rng.uniform(0.8, 1.4) + 3 * smooth_noise(rng, h, w, 5))[..., None]
        img = base * (1 + 0.12 * n) + 40 * np.clip(waves - 0.6, 0, 1)
    elif name == "sand":
        base = jitter(rng, (215, 190, 130), 20)
        img = base * (1 + 0.08 * n + 0.12 * rng.uniform(-1, 1, (h, w, 1)))
    elif name == "snow":
        img = jitter(rng, (236, 240, 250), 10) * (1 + 0.04 * n)
    elif name == "road":
        base = jitter(rng, (85, 85, 90), 20)
        img = base * (1 + 0.1 * n + 0.1 * rng.uniform(-1, 1, (h, w, 1)))
    else:
        raise ValueError(f"unknown stuff class {name!r}")
    return np.clip(img, 0, 255).astype(np.float32)


def fill(texture: str, rgb: np.ndarray, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) colours for pixels at local coordinates u, v (N,) of an object with a base colour and texture.

    Stripes and checks live in the object's frame, so they turn and scale with it.
    """
    freq = rng.uniform(2.5, 4.0)
    if texture == "flat":
        mod = np.ones_like(u)
    elif texture == "stripes":
        mod = 1.0 + 0.22 * np.sign(np.sin(freq * (u + 0.5 * v)))
    elif texture == "checks":
        mod = 1.0 + 0.2 * np.sign(np.sin(freq * u) * np.sin(freq * v))
    elif texture == "noise":
        mod = 1.0 + 0.18 * np.sin(freq * u + rng.uniform(0, 6)) * np.cos(1.3 * freq * v + rng.uniform(0, 6))
    else:
        raise ValueError(f"unknown texture {texture!r}")
    out = rgb[None, :] * mod[:, None]
    if rgb.mean() > 200:  # keep white objects textured: darken instead of saturating
        out = rgb[None, :] * (mod[:, None] - 0.22)
    return np.clip(out, 0, 255)


def role_colour(role: str, base: np.ndarray, accent: tuple[int, int, int] | None) -> np.ndarray:
    """The flat colour of a non-"main" piece given the object's base colour."""
    if role == "shade":
        return base * 0.62 if base.mean() > 60 else np.minimum(base + 70, 255)
    if role == "dark":
        return np.full(3, 24.0) if base.mean() > 70 else np.full(3, 228.0)
    if role == "accent":
        return np.asarray(accent, np.float32)
    raise ValueError(f"unknown role {role!r}")


def named_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    return jitter(rng, COLOURS[name], 18)
