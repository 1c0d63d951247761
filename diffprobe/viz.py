"""Pictures shared by the tasks: a fixed colour palette, heat-map overlays and grids of maps."""

from __future__ import annotations

import colorsys

import numpy as np


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, well separated and the same for the same index in every picture."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rows = [colorsys.hsv_to_rgb(h, 0.75 if i % 2 else 0.95, 0.95 if i % 3 else 0.8) for i, h in enumerate(hues)]
    return (np.array(rows).reshape(n, 3) * 255).round().astype(np.uint8)


def _resize(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(arr, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend a heat map (h, w) (any range; min-max scaled) over an RGB uint8 image (H, W, 3)."""
    import cv2

    heat = np.asarray(heat, dtype=np.float32)
    lo, hi = float(heat.min()), float(heat.max())
    norm = np.zeros_like(heat) if hi <= lo else (heat - lo) / (hi - lo)
    norm = _resize(norm, image.shape[:2])
    colour = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (image * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def map_grid(image: np.ndarray, rows: list[tuple[str, np.ndarray, list[str]]], panel: float = 1.3):
    """A matplotlib figure: one row per (row title, maps (n, h, w), column titles), maps over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(len(maps) for _, maps, _ in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(panel * ncols, panel * len(rows) + 0.3), squeeze=False)
    for r, (title, maps, titles) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(maps):
                ax.imshow(heat_overlay(image, maps[c]))
                ax.set_title(titles[c], fontsize=6)
        axes[r, 0].text(-0.05, 0.5, title, transform=axes[r, 0].transAxes, fontsize=5, ha="right", va="center")
    fig.tight_layout()
    return fig
