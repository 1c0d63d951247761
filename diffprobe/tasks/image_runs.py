"""Running a task over the user's images (a file or a folder) through the one item loop (diffprobe.items): one
record and one folder per image, progress, checkpoints, resume, shards.

Each image gets its own folder, out_dir/<name>, name = image_folders(): its stem made safe (x.png and x.jpg
become x_png and x_jpg). An image that fails, for any reason, is skipped and listed instead of stopping the run;
the run then ends with a one-line error naming how many were skipped, after every other image is done. A rerun
in the same folder continues: done images are kept, skipped ones are tried again.

summary.json (written at every checkpoint, on Ctrl-C and at the end): {"task", "done", "total",
"images": {image path: {"dir": folder relative to the run, ...the task's fields}}, "skipped": {image path: reason}}.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from diffprobe.data.images import load_image
from diffprobe.errors import DiffprobeError
from diffprobe.io import save_json
from diffprobe.items import ItemState, run_items
from diffprobe.runfolder import image_folders

log = logging.getLogger(__name__)


def files_fingerprint(files: list[Path]) -> str:
    """A short identity of the list of input images (their count and a hash of their paths)."""
    digest = hashlib.sha1("\n".join(str(f) for f in files).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{len(files)} images ({digest})"


def summary_of(state: ItemState, files: list[Path], task: str) -> dict:
    """summary.json's content from the item state's records: images keyed by their path as given, or relative to
    the run folder for an image inside it (the demo scene)."""
    run = Path(state.out_dir).resolve()
    keys = [str(f.resolve().relative_to(run)) if f.resolve().is_relative_to(run) else str(f) for f in map(Path, files)]
    images, skipped = {}, {}
    for i in sorted(state.records):
        record = dict(state.records[i])
        if "skipped" in record:
            skipped[keys[i]] = record["skipped"]
        else:
            images[keys[i]] = record
    return {"task": task, "done": len(images), "total": len(files), "images": images, "skipped": skipped}


def process_images(files: list[Path], process: Callable[[Path, object, str], dict], out_dir: Path, task: str,
                   fingerprint: dict) -> dict:
    """process(path, PIL image, folder name) -> the image's record (its files go to out_dir/<folder name>);
    writes out_dir/summary.json and returns its content. `fingerprint`: the run's settings (a rerun with other
    settings in the same folder is refused). Over several processes (diffprobe.distributed) each takes every
    w-th image and summary.json joins them at the end."""
    names = image_folders(files)
    fingerprint = {**fingerprint, "images": files_fingerprint(files)}

    def item(i: int):
        path = files[i]
        try:
            record = {"dir": names[i], **process(path, load_image(path), names[i])}
        except Exception as exc:  # noqa: BLE001 - any failure of one image must not end a folder run
            if len(files) == 1:
                raise
            reason = str(exc) if isinstance(exc, DiffprobeError) else f"{type(exc).__name__}: {exc}"
            log.warning("skipping %s: %s", path, reason, exc_info=log.isEnabledFor(logging.DEBUG))
            record = {"skipped": reason}
        return lambda: record

    def write_summary(state: ItemState) -> dict:
        summary = summary_of(state, files, task)
        save_json(out_dir / "summary.json", summary)
        return summary

    state = run_items(len(files), item, {}, out_dir, fingerprint, name="images", desc=task, checkpoint_every=10,
                      checkpoint_minutes=2.0, on_save=write_summary, redo=lambda record: "skipped" in record)
    from diffprobe import distributed

    summary = write_summary(state) if distributed.shard()[0] == 0 else summary_of(state, files, task)
    if summary["skipped"]:
        raise DiffprobeError(f"{len(summary['skipped'])} of {len(files)} images failed and were skipped (listed in "
                             f"{out_dir / 'summary.json'}); the others are done")
    return summary


@dataclass
class Job:
    """A task's part of one pass over an image: its heads, and write(their results, image path, PIL image, the
    image's folder) -> the image's record. A task over image files defines job(cfg, backbone) -> Job; run_job
    runs it alone, task=analyze runs several tasks' jobs from one pass."""

    heads: list
    write: Callable[[list, Path, object, Path], dict]


def process_with_heads(bb, job: Job, files: list[Path], out_dir: Path, task: str, seed: int,
                       fingerprint: dict) -> dict:
    """process_images where each image gets one pass of the job's heads (run_heads, noise seeded by `seed`)."""
    import torch

    from diffprobe.runner import Item, run_heads

    def process(path: Path, image, name: str) -> dict:
        results = run_heads(bb, job.heads, Item(str(path), image), generator=torch.Generator().manual_seed(seed))
        return job.write(results, path, image, out_dir / name)

    return process_images(files, process, out_dir, task, fingerprint)


def run_job(cfg, out_dir: Path, task: str) -> dict:
    """The whole run of a task over image files: its keys validated (settings_of) before the model loads, the
    images (image=, or the world's demo scene), then its job over every image."""
    from diffprobe.config import load_configured_backbone, run_config, run_fingerprint
    from diffprobe.data.inputs import input_images

    module = importlib.import_module(f"diffprobe.tasks.{task}")
    module.settings_of(cfg)
    files = input_images(cfg.get("image"), out_dir)
    bb = load_configured_backbone(cfg)
    return process_with_heads(bb, module.job(cfg, bb), files, out_dir, task, run_config(cfg).seed,
                              run_fingerprint(cfg))
