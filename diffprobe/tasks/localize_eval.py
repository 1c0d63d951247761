"""task=localize_eval: WSOL scores of a word's localisation on CUB-200-2011 (bounding_boxes.txt; the real
layout, or the world written in it), beside raw cross-attention from the same call.

Every image of the split is analysed whole (squashed to the model's square: crop=none is the default here,
so the box stays inside what the model sees) with the prompt naming `words` (default [bird]); the heat maps
are scored at the analysed size against the image's box: GT-known Loc and MaxBoxAccV2 (diffprobe.eval.wsol).
Checkpoints every `checkpoint_every` images and `checkpoint_minutes`; rerunning in the same folder or
`resume=DIR` continues.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from omegaconf import DictConfig

from diffprobe.config import load_configured_backbone, run_config, section
from diffprobe.errors import DiffprobeError
from diffprobe.eval.wsol import WSOLMeter
from diffprobe.io import save_json, save_text
from diffprobe.items import run_items
from diffprobe.runner import Item, run_heads
from diffprobe.heads.localize import LocalizeSettings
from diffprobe.tasks import localize
from diffprobe.tasks.localize import make_head


@dataclass
class LocalizeEvalSettings:
    LIMITS: ClassVar[dict] = {"limit": ">= 1", "checkpoint_every": ">= 1", "checkpoint_minutes": "> 0"}

    split: str = "test"
    limit: int | None = None
    checkpoint_every: int = 25
    checkpoint_minutes: float = 5.0
    resume: str | None = None


def settings_of(cfg: DictConfig) -> tuple[LocalizeEvalSettings, LocalizeSettings]:
    """The localize_eval.* and localize.* keys, validated (the word defaults to "bird", the crop to none)."""
    ev = section(cfg, "localize_eval", LocalizeEvalSettings)
    data = cfg.get("data")
    if data is None or data.get("name") != "cub" or not data.get("root"):
        raise DiffprobeError("task=localize_eval scores data=cub data.root=PATH (CUB-200-2011, or the world written "
                             "by task=world world.format=cub)")
    if not cfg.localize.words:
        cfg.localize.words = ["bird"]
    if cfg.localize.crop == "center":
        cfg.localize.crop = "none"
    settings = localize.settings_of(cfg)
    if len(settings.words) != 1:
        raise DiffprobeError(f"localize_eval scores one word per image (the dataset's class), got {settings.words}")
    return ev, settings


def run(cfg: DictConfig, out_dir: Path) -> dict:
    from diffprobe.data.cub import CubDataset

    ev, settings = settings_of(cfg)
    data = cfg.data
    dataset = CubDataset(data.root, ev.split, classes=data.get("classes"))
    count = len(dataset) if ev.limit is None else min(int(ev.limit), len(dataset))
    if count == 0:
        raise DiffprobeError(f"the {ev.split} split of {data.root} holds no image")
    bb = load_configured_backbone(cfg)
    head = make_head(bb, settings)
    meters = {"refined": WSOLMeter(), "raw": WSOLMeter()}
    fingerprint = {"model": cfg.model.name, "root": str(data.root), "split": ev.split, "images": count,
                   "localize": asdict(settings)}
    seed = run_config(cfg).seed

    def process(i: int):
        image = dataset.load_image(i)
        size = (head.size, head.size)
        (result,) = run_heads(bb, [head], Item(str(i), image, {"output_size": size}),
                              generator=torch.Generator().manual_seed(seed))
        x, y, w, h = dataset[i].bbox
        sx, sy = size[1] / image.width, size[0] / image.height
        box = np.array([[x * sx, y * sy, (x + w) * sx, (y + h) * sy]])

        def commit() -> None:
            meters["refined"].update(result.refined[0].numpy(), box)
            meters["raw"].update(result.raw[0].numpy(), box)

        return commit

    run_items(count, process, meters, out_dir, fingerprint, resume=ev.resume, checkpoint_every=ev.checkpoint_every,
              checkpoint_minutes=ev.checkpoint_minutes, desc="localize_eval cub")
    rows = {f"{settings.method} (refined)": meters["refined"].result(), "raw cross-attention": meters["raw"].result()}
    lines = [f"Localisation of {settings.words[0]!r} on CUB {ev.split} ({count} images, model {cfg.model.name}, "
             f"prompt {settings.full_prompt()!r}, {head.size} px)", "",
             "| heat map | GT-known Loc (%) | MaxBoxAccV2 (%) | @0.3 | @0.5 | @0.7 |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['gt_known_loc']:.1f} | {r['max_box_acc_v2']:.1f} | {r['max_box_acc@0.3']:.1f} | "
                     f"{r['max_box_acc@0.5']:.1f} | {r['max_box_acc@0.7']:.1f} |")
    table = "\n".join(lines)
    print(table)
    report = {"results": rows, **fingerprint}
    save_json(out_dir / "metrics.json", report)
    save_text(out_dir / "metrics.md", table + "\n")
    return report
