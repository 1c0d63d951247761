"""task=localize: find words in an image (or a folder) by their cross-attention refined over the
self-attention graph.

Writes per image, in out_dir/<image folder>/: localization.json (per word: the box and every component's box in
original pixels, mask size, peak, its mask file), <word>_mask.png (0/255, original size; the word made safe as
a file name), maps.safetensors (raw and refined
heat maps at the analysed size) and figure.png (per word: the box on the image, raw and refined heat, mask).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from diffprobe.config import section
from diffprobe.data.images import size_of
from diffprobe.heads.call import analysed_box
from diffprobe.heads.localize import Localization, LocalizeHead, LocalizeSettings
from diffprobe.io import save_figure, save_json, save_png, save_tensors
from diffprobe.report import page_maps, write_report
from diffprobe.runfolder import unique_names
from diffprobe.tasks.image_runs import Job, run_job
from diffprobe.viz import heat_overlay


def make_head(bb, settings: LocalizeSettings) -> LocalizeHead:
    size = bb.check_image_size(settings.image_size)
    words = [str(w) for w in settings.words]
    return LocalizeHead(settings, bb.word_positions(settings.full_prompt(), words), size)


def to_original(box, analysed: tuple[int, int, int, int], size: tuple[int, int]) -> list[float] | None:
    """A box (x0, y0, x1, y1) in the analysed square of `size` (H, W) -> original image pixels."""
    if box is None:
        return None
    left, top, bw, bh = analysed
    sx, sy = bw / size[1], bh / size[0]
    return [left + box[0] * sx, top + box[1] * sy, left + box[2] * sx, top + box[3] * sy]


def figure(image, result: Localization, analysed, title: str):
    """One row per word: the image with the box, raw heat, refined heat, mask (on the analysed square)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    left, top, bw, bh = analysed
    crop = np.asarray(image.convert("RGB").crop((left, top, left + bw, top + bh)))
    n = len(result.words)
    fig, axes = plt.subplots(n, 4, figsize=(12, 3.2 * n), squeeze=False)
    for row, word in enumerate(result.words):
        panels = [("image and box", crop), ("cross-attention (raw)", heat_overlay(crop, result.raw[row].numpy())),
                  ("refined", heat_overlay(crop, result.refined[row].numpy())),
                  ("mask", result.masks[row].numpy())]
        for ax, (name, arr) in zip(axes[row], panels):
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
            ax.set_title(f"{word}: {name}" if name == "image and box" else name)
            ax.axis("off")
        box = result.boxes[row]
        if box is not None:
            sx, sy = bw / result.masks.shape[2], bh / result.masks.shape[1]
            axes[row][0].add_patch(Rectangle((box[0] * sx - 0.5, box[1] * sy - 0.5), (box[2] - box[0]) * sx,
                                             (box[3] - box[1]) * sy, fill=False, color="yellow", lw=2))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_localization(result: Localization, head: LocalizeHead, path: Path, image, target: Path) -> dict:
    """The files of one image, in its folder `target`, from the head's result."""
    settings = head.settings
    analysed = analysed_box(image.width, image.height, settings.crop)
    size = tuple(result.masks.shape[1:])
    words = []
    for k, (word, name) in enumerate(zip(result.words, unique_names(result.words))):
        mask = np.zeros((image.height, image.width), np.uint8)
        left, top, bw, bh = analysed
        scaled = Image.fromarray(result.masks[k].numpy().astype(np.uint8) * 255).resize((bw, bh), Image.NEAREST)
        mask[top:top + bh, left:left + bw] = np.asarray(scaled)
        save_png(target / f"{name}_mask.png", mask)
        peak = int(result.refined[k].argmax())
        px, py = peak % size[1] + 0.5, peak // size[1] + 0.5
        words.append({"word": word, "mask": f"{name}_mask.png", "box": to_original(result.boxes[k], analysed, size),
                      "components": [to_original(b, analysed, size) for b in result.components[k]],
                      "mask_pixels": int((mask > 0).sum()),
                      "peak": to_original([px, py, px, py], analysed, size)[:2]})
    record = {"image": str(path), "size": size_of(image), "analysed_box": list(analysed),
              "prompt": settings.full_prompt(), "words": words, "settings": asdict(settings)}
    save_json(target / "localization.json", record)
    save_tensors(target / "maps.safetensors", {"raw": result.raw, "refined": result.refined},
                 metadata={"words": ",".join(result.words)})
    save_figure(target / "figure.png", figure(image, result, analysed, f"{path.name}: {settings.method} "
                                                                          f"(threshold {settings.threshold})"))
    left, top, bw, bh = analysed
    scale = (bw / size[1], bh / size[0]) * 2
    boxes = [{"label": w, "box": [v * s for v, s in zip(b, scale)]} for w, b in zip(result.words, result.boxes)
             if b is not None]
    crop = np.asarray(image.convert("RGB").crop((left, top, left + bw, top + bh)))
    write_report(target / "report.html", f"{path.name}: localize ({settings.method})", crop, result.words,
                 {(0, 0): page_maps(result.refined.numpy()), (1, 0): page_maps(result.raw.numpy())},
                 ["refined", "raw cross-attention"], boxes=boxes)
    return {"boxes": {w["word"]: w["box"] for w in words}}


def settings_of(cfg: DictConfig) -> LocalizeSettings:
    """The localize.* keys, the attention levels resolved (the model's model.attention_divisors, else all),
    validated; with no image= and no words, the demo scene's things and caption."""
    if not cfg.get("image") and not cfg.localize.words:
        from diffprobe.data.inputs import DEMO_SIZE
        from diffprobe.data.world import demo_scene

        scene = demo_scene(0, DEMO_SIZE)
        cfg.localize.words = sorted({o.category for o in scene.objects})
        cfg.localize.prompt = scene.caption
    settings = section(cfg, "localize", LocalizeSettings, model_defaults={"divisors": "attention_divisors"})
    settings.params()  # fail on bad keys before loading a model
    return settings


def job(cfg: DictConfig, bb) -> Job:
    """The localize head and the writer of an image's files."""
    head = make_head(bb, settings_of(cfg))
    return Job([head], lambda res, path, image, target: write_localization(res[0], head, path, image, target))


def run(cfg: DictConfig, out_dir: Path) -> dict:
    return run_job(cfg, out_dir, "localize")
