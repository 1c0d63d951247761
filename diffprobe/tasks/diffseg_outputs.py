"""Files written per image by `task=diffseg`: label PNG, colour overlay, segment table, figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffprobe.io import save_figure, save_json, save_png
from diffprobe.report import page_maps, write_report
from diffprobe.viz import palette


def label_dtype(num_labels: int) -> tuple[type, int]:
    """(dtype, value for pixels outside the analysed square): uint8/255 up to 255 labels, else uint16/65535."""
    return (np.uint8, 255) if num_labels <= 255 else (np.uint16, 65535)


def boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another label."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def colourise(labels: np.ndarray, num_labels: int, outside: int) -> np.ndarray:
    """(H, W, 3) uint8: each label in its palette colour, pixels outside the analysed area black."""
    colours = np.vstack([palette(num_labels), np.zeros((1, 3), np.uint8)])
    return colours[np.where(labels == outside, num_labels, labels)]


def overlay(image: Image.Image, labels: np.ndarray, num_labels: int, outside: int, alpha: float = 0.5) -> np.ndarray:
    """The image with label colours blended in and segment boundaries drawn dark."""
    img = np.asarray(image, dtype=np.float32)
    inside = (labels != outside)[..., None]
    out = np.where(inside, (1 - alpha) * img + alpha * colourise(labels, num_labels, outside), img)
    out[boundaries(labels)] *= 0.3
    return out.round().clip(0, 255).astype(np.uint8)


def segment_table(labels: np.ndarray, num_labels: int, outside: int, words: list[str] | None = None) -> list[dict]:
    """Per label: pixel count, fraction of the segmented pixels, bbox [x0, y0, x1, y1] (inclusive), centroid."""
    counts = np.bincount(labels[labels != outside].ravel(), minlength=num_labels)
    total = max(int(counts.sum()), 1)
    rows = []
    for k in range(num_labels):
        ys, xs = np.nonzero(labels == k)
        row = {"label": k, "pixels": int(counts[k]), "fraction": counts[k] / total,
               "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
               "centroid": [float(xs.mean()), float(ys.mean())]}
        if words is not None:
            row["word"] = words[k]
        rows.append(row)
    return rows


def figure(image: Image.Image, labels: np.ndarray, num_labels: int, outside: int, title: str,
           words: list[str] | None = None):
    """Side by side: input | overlay | labels (word names at segment centroids when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5 * labels.shape[0] / labels.shape[1] + 0.8))
    panels = [("input", np.asarray(image)), ("overlay", overlay(image, labels, num_labels, outside)),
              (f"{num_labels} segment{'' if num_labels == 1 else 's'}", colourise(labels, num_labels, outside))]
    for ax, (name, arr) in zip(axes, panels):
        ax.imshow(arr)
        ax.set_title(name)
        ax.axis("off")
    if words is not None:
        for row in segment_table(labels, num_labels, outside, words):
            axes[2].text(*row["centroid"], row["word"], ha="center", va="center", fontsize=9,
                         bbox=dict(facecolor="white", alpha=0.7, lw=0))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_outputs(out_dir: Path, title: str, image: Image.Image, labels: np.ndarray, num_labels: int,
                  info: dict, words: list[str] | None = None) -> dict:
    """Write labels.png, overlay.png, segments.json, figure.png into out_dir; returns the JSON content."""
    dtype, outside = label_dtype(num_labels)
    labels = labels.astype(dtype)
    save_png(out_dir / "labels.png", labels)
    save_png(out_dir / "overlay.png", overlay(image, labels, num_labels, outside))
    record = {**info, "num_segments": num_labels, "outside_value": outside,
              "segments": segment_table(labels, num_labels, outside, words)}
    save_json(out_dir / "segments.json", record)
    save_figure(out_dir / "figure.png", figure(image, labels, num_labels, outside, title, words))
    names = words or [f"segment {k}" for k in range(num_labels)]
    masks = page_maps(np.stack([(labels == k).astype(np.float32) for k in range(num_labels)]))
    write_report(out_dir / "report.html", f"{title}: {num_labels} segments", np.asarray(image.convert("RGB")),
                 names, {(0, 0): masks}, ["segment masks"],
                 labels=np.where(labels == outside, num_labels, labels).astype(np.int64))
    return record
