"""task=world: write a split of the procedural world to disk in a real dataset's layout.

    python -m diffprobe task=world world.format=coco_stuff world.n=200 world.out=data/world_coco
    python -m diffprobe task=world world.format=cub                 # birds, CUB-200-2011 layout
    python -m diffprobe task=world world.format=celeba              # faces, CelebA + MAFL layout
    python -m diffprobe task=world world.format=spair               # face/bird/house pairs, SPair-71k layout
    python -m diffprobe task=world world.format=images              # plain PNGs + world.json (for image=...)

Train/test parts come from disjoint seed streams (docs/world.md); world.json beside the files holds the
full ground truth. Output goes to world.out (default: <run dir>/<format>).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from tqdm.auto import tqdm

from diffprobe.config import typed
from diffprobe.data.world import render_scene, scene_seed
from diffprobe.data.world import export
from diffprobe.data.world.pairs import world_pairs
from diffprobe.data.world.vocab import FIGURES
from diffprobe.errors import DiffprobeError
from diffprobe.io import allow_writes, save_json, save_png
from diffprobe.runfolder import make_run_dir

FORMATS = ("coco_stuff", "celeba", "cub", "spair", "images")
MAX_SCENES = 1_000_000  # a split is rendered in memory first


@dataclass
class WorldSettings:
    LIMITS: ClassVar[dict] = {"n": f"1..{MAX_SCENES}", "n_train": f"0..{MAX_SCENES}", "size": "64..4096"}

    format: str = "images"
    split: str = "test"  # the split written by coco_stuff / images (celeba, cub, spair write train and test)
    n: int = 100  # scenes (coco_stuff, images), test images (celeba, cub) or test pairs per category (spair)
    n_train: int = 0  # train images (celeba, cub) or train pairs per category (spair)
    size: int = 64
    out: str | None = None
    closeup: bool | None = None  # one large centred figure per image; null: yes for celeba and cub (aligned data)


def _scenes(split: str, n: int, size: int, seed: int, first: str | None = None, max_objects: int = 3,
            closeup: bool = False):
    return [render_scene(scene_seed(split, i, seed), size, first=first, max_objects=max_objects, closeup=closeup)
            for i in tqdm(range(n), desc=f"render {split}", leave=False)]


def settings_of(cfg) -> WorldSettings:
    """The world.* keys, validated."""
    p = typed(cfg.get("world") or {}, WorldSettings, "world")
    if p.format not in FORMATS:
        raise DiffprobeError(f"world.format must be one of {', '.join(FORMATS)}, not {p.format!r}")
    return p


def run(cfg, out_dir: Path) -> dict:
    p = settings_of(cfg)
    seed = int(cfg.get("seed", 0) or 0)
    out = Path(p.out) if p.out else out_dir / p.format
    if p.out:  # an output folder the user named: made (or refused) now, and written to like the run folder
        make_run_dir(out, "world.out folder")
        allow_writes(out)
    if p.format == "coco_stuff":
        root = export.write_coco_stuff(out, _scenes(p.split, p.n, p.size, seed))
    elif p.format in ("celeba", "cub"):
        cat = "face" if p.format == "celeba" else "bird"
        occluders = 1 if cat == "face" else 3  # CelebA faces are single aligned faces
        closeup = True if p.closeup is None else p.closeup
        train = _scenes("train", p.n_train, p.size, seed, cat, occluders, closeup)
        test = _scenes("test", p.n, p.size, seed, cat, occluders, closeup)
        root = (export.write_celeba if cat == "face" else export.write_cub)(out, train, test)
    elif p.format == "spair":
        pairs = {"test": [q for c in FIGURES for q in world_pairs("test", c, p.n, p.size, seed)]}
        if p.n_train:
            pairs["train"] = [q for c in FIGURES for q in world_pairs("train", c, p.n_train, p.size, seed)]
        root = export.write_spair(out, pairs)
    else:
        if p.closeup:
            raise DiffprobeError(f"world.closeup applies to the celeba and cub formats, not {p.format}")
        scenes = _scenes(p.split, p.n, p.size, seed)
        for i, s in enumerate(scenes):
            save_png(out / f"{p.split}_{i:05d}.png", s.image)
        save_json(out / "world.json", {f"{p.split}_{i:05d}.png": s.to_dict() for i, s in enumerate(scenes)})
        root = out
    result = {"format": p.format, "root": str(root), "n": p.n, "n_train": p.n_train, "size": p.size,
              "closeup": p.format in ("celeba", "cub") and p.closeup is not False}
    save_json(out_dir / "results.json", result)
    return result
