"""task=diffseg_eval: DiffSeg on COCO-Stuff-27 or Cityscapes, pixel accuracy and mIoU.

Both matching protocols are reported and named (see diffprobe.eval.segmentation): "per_image" is the
DiffSeg reference's; "dataset" is PiCIE/STEGO's. Images and labels are centre-cropped to a square and
resized to image_size (labels by nearest neighbour), as the reference does. The run checkpoints its
metrics every `checkpoint_every` images and `checkpoint_minutes` (eval_state.safetensors + eval_state.json);
rerunning in the same folder (hydra.run.dir=) or `resume=OLD_OUTPUT_DIR` continues with the same settings.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig

from diffprobe.config import load_configured_backbone, run_config, section, typed
from diffprobe.data.cityscapes import Cityscapes27
from diffprobe.data.coco_stuff import CocoStuff27
from diffprobe.data.labelled_images import center_crop_label
from diffprobe.errors import DiffprobeError
from diffprobe.eval.segmentation import DatasetHungarian, PerImageHungarian, SegmentCount
from diffprobe.io import save_json, save_text
from diffprobe.items import run_items
from diffprobe.runner import Item, run_heads
from diffprobe.tasks import diffseg
from diffprobe.tasks.diffseg import DiffSegTaskSettings, heads_for

log = logging.getLogger(__name__)


@dataclass
class DiffSegEvalSettings:
    LIMITS: ClassVar[dict] = {"limit": ">= 1", "checkpoint_every": ">= 1", "checkpoint_minutes": "> 0"}

    limit: int | None = None  # evaluate the first `limit` images only
    checkpoint_every: int = 25
    checkpoint_minutes: float = 5.0
    resume: str | None = None  # an earlier output folder of this task to continue


@dataclass
class EvalDataSettings:
    name: str = ""
    root: Any = None
    list_file: Any = None
    split: str = "val"
    diffseg_tau: Any = None


def open_dataset(data: EvalDataSettings):
    if not data.root:
        raise DiffprobeError(f"data.root is not set: data={data.name or 'coco_stuff27'} data.root=PATH")
    if data.name == "coco_stuff27":
        return CocoStuff27(data.root, list_file=data.list_file)
    if data.name == "cityscapes":
        return Cityscapes27(data.root, split=data.split)
    raise DiffprobeError(f"task=diffseg_eval evaluates data=coco_stuff27 or data=cityscapes, not {data.name!r}")


def format_table(title: str, results: list[dict]) -> str:
    lines = [title, "", "| matching | images | pixel accuracy (%) | mIoU (%) |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['matching']} | {r['images']} | {100 * r['pixel_accuracy']:.1f} | {100 * r['miou']:.1f} |")
    return "\n".join(lines)


def settings_of(cfg: DictConfig) -> tuple[DiffSegEvalSettings, EvalDataSettings, DiffSegTaskSettings]:
    """The diffseg_eval.* keys, the data config and the diffseg.* keys (tau: the model's, else the dataset's),
    validated."""
    ev = section(cfg, "diffseg_eval", DiffSegEvalSettings)
    if cfg.get("data") is None:
        raise DiffprobeError("task=diffseg_eval needs a dataset: data=coco_stuff27 data.root=PATH (or data=cityscapes)")
    data = typed(cfg.data, EvalDataSettings, "data")
    return ev, data, diffseg.settings_of(cfg, data.diffseg_tau)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    ev, data, settings = settings_of(cfg)
    dataset = open_dataset(data)
    count = len(dataset) if ev.limit is None else min(int(ev.limit), len(dataset))
    meters = {"per_image": PerImageHungarian(dataset.num_classes), "dataset": DatasetHungarian(dataset.num_classes),
              "segments": SegmentCount()}
    keep = {k: v for k, v in asdict(settings).items() if k != "labels"}
    fingerprint = {"model": cfg.model.name, "data": data.name, "root": str(data.root), "images": count,
                   "diffseg": keep}
    bb = load_configured_backbone(cfg)
    heads = heads_for(bb, settings)[:1]
    size = heads[0].size
    seed = run_config(cfg).seed

    def process(i: int):
        image, label = dataset.load(i)
        item = Item(str(i), image, {"output_size": (size, size)})
        (result,) = run_heads(bb, heads, item, generator=torch.Generator().manual_seed(seed))
        label, pred = center_crop_label(label, size), result.labels.numpy()
        def commit() -> None:
            for meter in meters.values():
                meter.update(label, pred)

        return commit

    run_items(count, process, meters, out_dir, fingerprint, resume=ev.resume, checkpoint_every=ev.checkpoint_every,
              checkpoint_minutes=ev.checkpoint_minutes, desc=f"diffseg_eval {data.name}")
    results = [meters["per_image"].result(), meters["dataset"].result()]
    segments = meters["segments"].result()["segments_per_image"]
    if settings.method == "ncut":
        method = f"normalised cut (tau {settings.ncut_tau}, alpha {settings.ncut_alpha}, {settings.ncut_affinity})"
    else:
        numerics = ", float16 KL" if heads[0].params.reference_numerics else ""
        method = f"DiffSeg (tau {settings.tau}, merge {settings.merge}{numerics}, refine {settings.refine})"
    title = (f"{method}{' + PAMR' if settings.pamr else ''} on {data.name} ({count} images, model {cfg.model.name}, "
             f"{size} px; {segments:.1f} segments per image)")
    table = format_table(title, results)
    print(table)
    report = {"title": title, "class_names": list(dataset.class_names), "results": results,
              "segments_per_image": segments, **fingerprint}
    save_json(out_dir / "metrics.json", report)
    save_text(out_dir / "metrics.md", table + "\n")
    return report
