"""task=diffseg_eval: DiffSeg on COCO-Stuff-27 or Cityscapes-27, pixel accuracy and mIoU.

Both matching protocols are reported and named (see diffprobe.eval.segmentation): "per_image" is the
DiffSeg reference's; "dataset" is PiCIE/STEGO's. Images and labels are centre-cropped to a square and
resized to image_size (labels by nearest neighbour), as the reference does. The run checkpoints its
accumulators every `checkpoint_every` images (eval_state.safetensors + eval_state.json in the output
folder); `resume=OLD_OUTPUT_DIR` continues an interrupted run with the same settings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from diffprobe.config import load_configured_backbone, run_config, typed
from diffprobe.data.cityscapes import Cityscapes27
from diffprobe.data.coco_stuff import CocoStuff27
from diffprobe.data.images import image_to_tensor
from diffprobe.data.labelled_images import center_crop_label
from diffprobe.errors import DiffprobeError
from diffprobe.eval.segmentation import DatasetHungarian, PerImageHungarian, SegmentCount
from diffprobe.io import atomic_path, load_tensors, save_json, save_tensors
from diffprobe.tasks.diffseg_pipeline import DiffSegPipeline, DiffSegSettings, default_tau, head_params

log = logging.getLogger(__name__)
STATE = "eval_state"


@dataclass
class DiffSegEvalConfig(DiffSegSettings):
    tau: Any = None  # null: the model's model.diffseg_tau if it has one, else the dataset's data.diffseg_tau
    limit: Any = None  # evaluate the first `limit` images only
    checkpoint_every: int = 25
    resume: Any = None  # an earlier output folder of this task to continue


@dataclass
class DataConfig:
    name: str = ""
    root: Any = None
    list_file: Any = None
    split: str = "val"
    diffseg_tau: Any = None


def open_dataset(data: DataConfig):
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


def _fingerprint(cfg: DictConfig, params: DiffSegEvalConfig, data: DataConfig, count: int) -> dict:
    keep = {k: v for k, v in asdict(params).items() if k not in ("resume", "checkpoint_every")}
    return {"model": cfg.model.name, "data": data.name, "root": str(data.root), "images": count, "settings": keep}


def _restore(resume: str, fingerprint: dict, meters: dict) -> int:
    """Load the accumulators of an earlier run; returns the index of the next image."""
    folder = Path(resume)
    info_path = folder / f"{STATE}.json"
    if not info_path.is_file():
        raise DiffprobeError(f"resume: no {STATE}.json in {folder}")
    info = json.loads(info_path.read_text())
    if info["fingerprint"] != fingerprint:
        raise DiffprobeError(f"resume: {folder} was run with other settings ({info['fingerprint']})")
    tensors, _ = load_tensors(folder / f"{STATE}.safetensors")
    for key, meter in meters.items():
        meter.load_state({k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith(key + ".")})
    return int(info["next"])


def _checkpoint(out_dir: Path, fingerprint: dict, meters: dict, next_index: int) -> None:
    import torch

    tensors = {f"{key}.{k}": torch.from_numpy(np.asarray(v, dtype=np.float64)) for key, m in meters.items()
               for k, v in m.state().items()}
    save_tensors(out_dir / f"{STATE}.safetensors", tensors)
    save_json(out_dir / f"{STATE}.json", {"fingerprint": fingerprint, "next": next_index})


def run(cfg: DictConfig, out_dir: Path) -> dict:
    params = typed(cfg, DiffSegEvalConfig, "diffseg_eval")
    if cfg.get("data") is None:
        raise DiffprobeError("task=diffseg_eval needs a dataset: data=coco_stuff27 data.root=PATH (or data=cityscapes)")
    data = typed(cfg.data, DataConfig, "data")
    dataset = open_dataset(data)
    if params.tau is None:
        params.tau = default_tau(cfg.model, data.diffseg_tau)
    head_params(params)  # fail on bad head keys before loading a model
    count = len(dataset) if params.limit is None else min(int(params.limit), len(dataset))
    meters = {"per_image": PerImageHungarian(dataset.num_classes), "dataset": DatasetHungarian(dataset.num_classes),
              "segments": SegmentCount()}
    fingerprint = _fingerprint(cfg, params, data, count)
    start = _restore(params.resume, fingerprint, meters) if params.resume else 0
    pipeline = DiffSegPipeline(load_configured_backbone(cfg), params, seed=run_config(cfg).seed)
    size = pipeline.size
    for i in tqdm(range(start, count), desc=f"diffseg_eval {data.name}", initial=start, total=count):
        image, label = dataset.load(i)
        result = pipeline.segment(image_to_tensor(image, size, crop="center", resize=params.resize), (size, size))
        label = center_crop_label(label, size)
        for meter in meters.values():
            meter.update(label, result.labels.numpy())
        if (i + 1) % params.checkpoint_every == 0 or i + 1 == count:
            _checkpoint(out_dir, fingerprint, meters, i + 1)
    results = [meters["per_image"].result(), meters["dataset"].result()]
    segments = meters["segments"].result()["segments_per_image"]
    title = (f"DiffSeg on {data.name} ({count} images, model {cfg.model.name}, tau {params.tau}, "
             f"merge {params.merge}{', float16 KL' if pipeline.params.reference_numerics else ''}, refine {params.refine}, {size} px; {segments:.1f} segments per image)")
    table = format_table(title, results)
    print(table)
    report = {"title": title, "class_names": list(dataset.class_names), "results": results,
              "segments_per_image": segments, **fingerprint}
    save_json(out_dir / "metrics.json", report)
    with atomic_path(out_dir / "metrics.md") as tmp:
        tmp.write_text(table + "\n")
    return report
