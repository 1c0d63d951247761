"""SPair-71k reader (the release layout) returning CorrespondencePair records.

    SPair-71k/
      JPEGImages/<category>/<image>.jpg
      PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json
          keys used: src_imname, trg_imname, category, src_kps, trg_kps, src_bndbox, trg_bndbox

Usage::

    pairs = read_spair(root, split="test")                       # all 12,234 test pairs
    pairs = read_spair(root, split="test", per_category=20)      # a seeded 20 x 18 = 360-pair subset

The authors of Diffusion Hyperfeatures evaluated on their own fixed 360-pair file
(annotations/spair_71k_test-360.json in their release); read it with `read_pairs_json(file,
image_root=root / "JPEGImages")` to use exactly those pairs. A seeded subset here is a different
sample of the same size: reports must say which.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from diffprobe.data.pairs_json import CorrespondencePair, box_array, points_array
from diffprobe.errors import DiffprobeError

SPLITS = {"train": "trn", "trn": "trn", "val": "val", "test": "test"}


def find_spair_root(root: str | Path) -> Path:
    """The folder holding PairAnnotation/: `root` itself or `root/SPair-71k`."""
    root = Path(root)
    for cand in (root, root / "SPair-71k"):
        if (cand / "PairAnnotation").is_dir():
            return cand
    raise DiffprobeError(f"SPair-71k: no PairAnnotation/ folder in {root} or {root / 'SPair-71k'}")


def _pair(path: Path, images: Path) -> CorrespondencePair:
    try:
        ann = json.loads(path.read_text())
        category = str(ann["category"])
        src, trg = images / category / ann["src_imname"], images / category / ann["trg_imname"]
        kps = (ann["src_kps"], ann["trg_kps"])
        boxes = (ann.get("src_bndbox"), ann.get("trg_bndbox"))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DiffprobeError(f"{path}: not an SPair-71k pair annotation ({exc!r})") from None
    for img in (src, trg):
        if not img.is_file():
            raise DiffprobeError(f"{path}: image {img} not found")
    return CorrespondencePair(
        source=src, target=trg,
        source_points=points_array(kps[0], f"{path} src_kps"), target_points=points_array(kps[1], f"{path} trg_kps"),
        category=category, source_bbox=box_array(boxes[0], f"{path} src_bndbox"),
        target_bbox=box_array(boxes[1], f"{path} trg_bndbox"), name=path.stem,
    )


def read_spair(root: str | Path, split: str = "test", categories: list[str] | None = None,
               per_category: int | None = None, seed: int = 0) -> list[CorrespondencePair]:
    """Pairs of one split ("train"/"trn", "val", "test") in file-name order.

    categories: keep only these; per_category: a seeded random sample of that many pairs per
    category (all of a category if it has fewer).
    """
    if split not in SPLITS:
        raise DiffprobeError(f"SPair-71k: split must be one of {sorted(SPLITS)}, got {split!r}")
    base = find_spair_root(root)
    folder = base / "PairAnnotation" / SPLITS[split]
    if not folder.is_dir():
        raise DiffprobeError(f"SPair-71k: missing {folder}")
    files = sorted(folder.glob("*.json"))
    by_cat: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        by_cat[f.stem.rsplit(":", 1)[-1]].append(f)
    if categories is not None:
        unknown = sorted(set(categories) - set(by_cat))
        if unknown:
            raise DiffprobeError(f"SPair-71k {split}: no pairs of categories {unknown} (have {sorted(by_cat)})")
        by_cat = {c: by_cat[c] for c in categories}
    if per_category is not None:
        if per_category < 1:
            raise DiffprobeError(f"SPair-71k: per_category must be positive, got {per_category}")
        rng = np.random.default_rng(seed)
        by_cat = {c: [fs[i] for i in sorted(rng.permutation(len(fs))[:per_category])] for c, fs in sorted(by_cat.items())}
    keep = {f for fs in by_cat.values() for f in fs}
    chosen = [f for f in files if f in keep]
    if not chosen:
        raise DiffprobeError(f"SPair-71k: no pair annotations in {folder}")
    images = base / "JPEGImages"
    return [_pair(f, images) for f in chosen]
