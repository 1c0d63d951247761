"""Figures of the hyperfeatures head: mixing weights (layer x timestep), training curves, matches."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.io import save_figure


def short_layer_name(name: str) -> str:
    """"up_blocks.1.resnets.0.hook_residual" -> "up1.res0"."""
    parts = name.split(".")
    out = []
    for i, p in enumerate(parts[:-1]):
        if p in ("up_blocks", "down_blocks", "resnets", "attentions") and i + 1 < len(parts):
            out.append({"up_blocks": "up", "down_blocks": "down", "resnets": "res", "attentions": "att"}[p] + parts[i + 1])
        elif p == "mid_block":
            out.append("mid")
    return ".".join(out) or name


def plot_mixing_weights(weights: np.ndarray, layers: list[str], step_labels: list[float], path: Path) -> Path:
    """Heatmap of the (L, S) softmax mixing weights: rows = layers 1..L, columns = saved steps (timesteps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, S = weights.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * S, 1.0 + 0.4 * L))
    im = ax.imshow(weights, cmap="viridis", aspect="auto")
    ax.set_yticks(range(L), [f"{i + 1} {short_layer_name(n)}" for i, n in enumerate(layers)], fontsize=7)
    labels = [f"{t:g}" for t in step_labels] if len(step_labels) == S else [str(s) for s in range(S)]
    ax.set_xticks(range(S), labels, fontsize=7, rotation=90)
    ax.set_xlabel("timestep of saved step (noise order)")
    ax.set_ylabel("layer")
    ax.set_title("mixing weights (softmax over all)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return save_figure(path, fig)


def plot_training_curves(history: dict, path: Path, alpha: float) -> Path:
    """Loss per step (raw and running mean) and validation PCK per validation step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    if history["loss"]:
        steps, loss = np.asarray(history["loss"], dtype=float).T
        ax1.plot(steps, loss, lw=0.6, alpha=0.5, label="loss")
        k = len(loss) // 20
        if k > 1:
            ax1.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
        ax1.legend(fontsize=7)
    ax1.set_xlabel("step")
    ax1.set_title("training loss")
    for row_i, label in ((1, f"PCK@{alpha:g}_img"), (2, f"PCK@{alpha:g}_bbox")):
        pts = [(r[0], r[row_i]) for r in history["val"] if r[row_i] is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=label)
    ax2.set_xlabel("step")
    ax2.set_title("validation PCK (per point)")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=7)
    return save_figure(path, fig)


def plot_matches(source_img, target_img, source_pts: np.ndarray, target_pts: np.ndarray, path: Path,
                 correct: np.ndarray | None = None, title: str = "") -> Path:
    """Source and target side by side (same height), a line per match; green/red when `correct` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = np.asarray(source_img), np.asarray(target_img)
    scale = a.shape[0] / b.shape[0]
    b_w = int(round(b.shape[1] * scale))
    from PIL import Image

    b = np.asarray(Image.fromarray(b).resize((b_w, a.shape[0])))
    canvas = np.concatenate([a, b], axis=1)
    fig, ax = plt.subplots(figsize=(8, 8 * canvas.shape[0] / canvas.shape[1] + 0.4))
    ax.imshow(canvas)
    colours = plt.cm.hsv(np.linspace(0, 1, max(len(source_pts), 1), endpoint=False))
    for i, (p, q) in enumerate(zip(np.asarray(source_pts), np.asarray(target_pts))):
        c = colours[i] if correct is None else ("lime" if correct[i] else "red")
        qx, qy = q[0] * scale + a.shape[1], q[1] * scale
        ax.plot([p[0], qx], [p[1], qy], color=c, lw=0.8)
        ax.scatter([p[0], qx], [p[1], qy], color=[c], s=10)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(path, fig)
