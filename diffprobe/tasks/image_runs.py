"""Running a task over the user's images (a file or a folder): one record per image, and an image that
cannot be read is skipped with a warning instead of stopping the run; the run then ends with a one-line
error naming how many were skipped (they are listed in summary.json), after every other image is done."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from diffprobe import distributed
from diffprobe.data.images import load_image
from diffprobe.errors import DiffprobeError
from diffprobe.io import save_json

log = logging.getLogger(__name__)


def process_images(files: list[Path], process: Callable[[Path, object], dict], out_dir: Path, desc: str) -> dict:
    """process(path, PIL image) -> record for each file; writes out_dir/summary.json {"images": {path: record},
    "skipped": {path: reason}} and returns it. Over several processes (diffprobe.distributed), process r of w
    takes files r, r + w, ... and writes summary_rank<r>of<w>.json; summary.json joins them at the end."""
    rank, world = distributed.shard()
    mine = files[rank::world]
    records, skipped = {}, {}
    for path in tqdm(mine, desc=desc, disable=len(mine) < 2):
        try:
            image = load_image(path)
        except DiffprobeError as exc:
            if len(files) == 1:
                raise
            log.warning("skipping %s: %s", path, exc)
            skipped[str(path)] = str(exc)
            continue
        records[str(path)] = process(path, image)
    summary = {"images": records, "skipped": skipped}
    if world > 1:
        save_json(out_dir / f"summary_rank{rank}of{world}.json", summary)
        distributed.wait_for_everyone()
        parts = [json.loads((out_dir / f"summary_rank{r}of{world}.json").read_text()) for r in range(world)]
        order = {str(p): i for i, p in enumerate(files)}
        summary = {key: dict(sorted(((k, v) for part in parts for k, v in part[key].items()),
                                    key=lambda kv: order.get(kv[0], len(order)))) for key in ("images", "skipped")}
        skipped = summary["skipped"]
    save_json(out_dir / "summary.json", summary)
    if skipped:
        raise DiffprobeError(f"{len(skipped)} of {len(files)} images could not be read and were skipped (listed in "
                             f"{out_dir / 'summary.json'}); the others are done")
    return summary


def process_with_heads(bb, heads: list, write: Callable[[list, Path, object], dict | str], files: list[Path],
                       out_dir: Path, desc: str, seed: int) -> dict:
    """process_images where each image gets one pass of `heads` (run_heads, noise seeded by `seed`) and its
    record is write(the heads' results, path, PIL image)."""
    import torch

    from diffprobe.runner import Item, run_heads

    def process(path: Path, image) -> dict | str:
        return write(run_heads(bb, heads, Item(str(path), image), generator=torch.Generator().manual_seed(seed)),
                     path, image)

    return process_images(files, process, out_dir, desc)
