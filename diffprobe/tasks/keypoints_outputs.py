"""Pictures and records written by task=keypoints: the overlay with numbered points and the loss curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.io import save_figure, save_json, save_png
from diffprobe.viz import palette


def draw_points(image, points: np.ndarray):
    """The RGB PIL image with point i drawn as a disc in palette colour i and numbered i (0-based).

    points (K, 2) x, y in the image's pixels. The same keypoint has the same colour in every image.
    """
    from PIL import ImageDraw, ImageFont

    img = image.copy()
    draw = ImageDraw.Draw(img)
    colours = palette(len(points))
    r = max(3.0, min(img.size) / 80)
    try:
        font = ImageFont.load_default(size=max(10, int(r * 3)))
    except TypeError:              # Pillow < 10.1 has one fixed-size default font
        font = ImageFont.load_default()
    for i, (x, y) in enumerate(np.asarray(points, dtype=float)):
        c = tuple(int(v) for v in colours[i])
        draw.ellipse((x - r, y - r, x + r, y + r), fill=c, outline=(0, 0, 0), width=max(1, int(r / 3)))
        draw.text((x + r + 1, y - r - 1), str(i), fill=c, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return img


def write_prediction(out_dir: Path, image_path: Path, image, points: np.ndarray, confidence: np.ndarray,
                     extra: dict) -> dict:
    """out_dir/keypoints.json (pixel coordinates in the original image) and out_dir/overlay.png."""
    record = {
        "image": str(image_path),
        "size": {"width": image.width, "height": image.height},
        "points": [{"id": i, "x": float(x), "y": float(y), "confidence": float(c)}
                   for i, ((x, y), c) in enumerate(zip(points, confidence))],
        **extra,
    }
    save_json(out_dir / "keypoints.json", record)
    save_png(out_dir / "overlay.png", draw_points(image, points))
    return record


def save_loss_curve(path: Path, history: list[dict]) -> None:
    """PNG of the total, localisation and equivariance losses per optimiser step (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "localisation", "equivariance"):
        ax.plot(steps, [row[key] for row in history], label=key, lw=1.2 if key == "loss" else 0.8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (total weighted; parts unweighted)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(path, fig)
    save_json(path.with_suffix(".json"), history)
