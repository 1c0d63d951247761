"""Templates drawn as skeletons: one panel per template, its frequency in the title."""

from __future__ import annotations

import numpy as np

from diffprobe.viz import palette


def template_figure(templates: np.ndarray, frequency: np.ndarray, edges=(), names=None, columns: int = 7):
    """A matplotlib figure of templates (T, K, 2) in the unit box (y down, as images), edges between point
    indices, points coloured by index (the keypoints' colours of task=keypoints)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = len(templates)
    cols = min(columns, t)
    rows = (t + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    colours = palette(templates.shape[1]) / 255.0
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= t:
            continue
        pts = templates[i]
        for a, b in edges:
            ax.plot(pts[[a, b], 0], pts[[a, b], 1], color="0.4", lw=1.2)
        ax.scatter(pts[:, 0], pts[:, 1], c=colours, s=22, edgecolors="k", linewidths=0.4, zorder=3)
        ax.set_xlim(-0.65, 0.65)
        ax.set_ylim(0.65, -0.65)
        ax.set_aspect("equal")
        ax.set_title(f"#{i}: {100 * frequency[i]:.1f} %", fontsize=8)
    fig.tight_layout()
    return fig
