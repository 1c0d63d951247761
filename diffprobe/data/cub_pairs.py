"""Correspondence pairs built from CUB-200-2011 part annotations (reader: diffprobe.data.cub).

Two images of the same species form a pair; their corresponding points are the parts visible in
both (15 named parts: beak, left eye, ...). Pairs are drawn with a seeded generator, so a run says
exactly which pairs it used by (split, pairs_per_class, seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.data.cub import CubDataset
from diffprobe.data.pairs_json import CorrespondencePair
from diffprobe.errors import DiffprobeError


def _xyxy(bbox: np.ndarray) -> np.ndarray:
    x, y, w, h = bbox
    return np.array([x, y, x + w, y + h], dtype=np.float64)


def cub_pairs(root: str | Path, split: str = "test", pairs_per_class: int = 5, min_common: int = 3,
              seed: int = 0, classes: list[int] | None = None) -> list[CorrespondencePair]:
    """Same-class pairs with at least `min_common` parts visible in both images.

    Up to `pairs_per_class` distinct random pairs per class (fewer when a class has too few usable
    pairs). Points are ordered by part id; the pair name is "<source id>-<target id>".
    """
    if pairs_per_class < 1 or min_common < 1:
        raise DiffprobeError("CUB pairs: pairs_per_class and min_common must be at least 1")
    ds = CubDataset(root, split=split, classes=classes)
    rng = np.random.default_rng(seed)
    pairs: list[CorrespondencePair] = []
    for cls, idx in sorted(ds.by_class().items()):
        candidates = [(i, j) for a, i in enumerate(idx) for j in idx[a + 1:]
                      if int((ds[i].visible & ds[j].visible).sum()) >= min_common]
        for k in rng.permutation(len(candidates))[:pairs_per_class]:
            src, trg = ds[candidates[k][0]], ds[candidates[k][1]]
            common = src.visible & trg.visible
            pairs.append(CorrespondencePair(
                source=src.path, target=trg.path,
                source_points=src.keypoints[common].astype(np.float64),
                target_points=trg.keypoints[common].astype(np.float64),
                category=ds.class_names.get(cls, str(cls)),
                source_bbox=_xyxy(src.bbox), target_bbox=_xyxy(trg.bbox),
                name=f"{src.image_id}-{trg.image_id}",
            ))
    if not pairs:
        raise DiffprobeError(f"CUB-200-2011 {split}: no same-class image pair shares {min_common} visible parts")
    return pairs
