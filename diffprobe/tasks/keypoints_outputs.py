"""Pictures and records written by task=keypoints: the overlay with numbered points and the loss curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.data.images import size_of
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
        "size": size_of(image),
        "points": [{"id": i, "x": float(x), "y": float(y), "confidence": float(c)}
                   for i, ((x, y), c) in enumerate(zip(points, confidence))],
        **extra,
    }
    save_json(out_dir / "keypoints.json", record)
    save_png(out_dir / "overlay.png", draw_points(image, points))
    return record


def draw_landmarks(image, pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, found: np.ndarray):
    """The RGB PIL image with the found keypoints (K, 2) as small grey dots, the ground-truth landmarks (L, 2)
    as hollow rings and the regressed ones (L, 2) as discs, landmark i in palette colour i; all in pixels."""
    from PIL import ImageDraw

    img = image.copy()
    draw = ImageDraw.Draw(img)
    r = max(2.0, min(img.size) / 40)
    for x, y in found:
        draw.ellipse((x - r / 2, y - r / 2, x + r / 2, y + r / 2), fill=(200, 200, 200), outline=(0, 0, 0))
    for i, ((px, py), (gx, gy), vis) in enumerate(zip(pred, gt, visible)):
        c = tuple(int(v) for v in palette(len(pred))[i])
        if vis:
            draw.ellipse((gx - r * 1.4, gy - r * 1.4, gx + r * 1.4, gy + r * 1.4), outline=c, width=max(1, int(r / 2)))
            draw.line((gx, gy, px, py), fill=c, width=1)
        draw.ellipse((px - r, py - r, px + r, py + r), fill=c, outline=(0, 0, 0))
    return img


def write_test_predictions(out_dir: Path, test, found: np.ndarray, pred: np.ndarray, gt: np.ndarray,
                           visible: np.ndarray, errors: np.ndarray, panels: int = 16, panel_size: int = 192) -> None:
    """out_dir/test_predictions.json (per test image: found points, regressed and true landmarks in [0, 1]
    of the processed square, visibility, the image's error) and test_predictions.png (the first `panels`
    test images, drawn by draw_landmarks at panel_size px)."""
    from PIL import Image

    rows = []
    per_image = iter(errors)
    for i in range(len(found)):
        err = float(next(per_image)) if visible[i].any() else None
        rows.append({"image": str(test.items[i].path), "found": found[i], "landmarks": pred[i], "gt": gt[i],
                     "visible": visible[i], "error": err})
    save_json(out_dir / "test_predictions.json", rows)
    n = min(panels, len(found))
    cols = min(n, 8)
    sheet = Image.new("RGB", (cols * panel_size, -(-n // cols) * panel_size), (255, 255, 255))
    for i in range(n):
        x = test.load(i)[0][0].permute(1, 2, 0).numpy()
        img = Image.fromarray(np.clip((x + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)).resize(
            (panel_size, panel_size), Image.BICUBIC)
        panel = draw_landmarks(img, pred[i] * panel_size, gt[i] * panel_size, visible[i], found[i] * panel_size)
        sheet.paste(panel, ((i % cols) * panel_size, (i // cols) * panel_size))
    save_png(out_dir / "test_predictions.png", np.asarray(sheet))


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
