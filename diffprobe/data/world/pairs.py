"""Pairs of world scenes whose first object shares a category, with corresponding keypoints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffprobe.data.world.scene import Scene, render_scene, scene_seed
from diffprobe.data.world.vocab import FIGURES
from diffprobe.errors import DiffprobeError

_PAIR_BASE = 1_000_000  # pair scenes use seed indices far from the plain split's


@dataclass
class WorldPair:
    """Two scenes; keypoint row i of `source_points` corresponds to row i of `target_points` (x, y px).

    Only keypoints visible in both images are listed; `keypoint_ids` index KEYPOINTS[category].
    """

    category: str
    source: Scene
    target: Scene
    keypoint_ids: list[int]
    source_points: np.ndarray
    target_points: np.ndarray


def world_pair(split: str, category: str, index: int, size: int = 64, base_seed: int = 0) -> WorldPair | None:
    """Pair `index` of `category` in `split`, or None when the two share fewer than 3 visible keypoints."""
    if category not in FIGURES:
        raise DiffprobeError(f"world pairs need a category with keypoints ({', '.join(FIGURES)}), got {category!r}")
    offset = _PAIR_BASE * (1 + FIGURES.index(category)) + 2 * index
    src, trg = (render_scene(scene_seed(split, offset + k, base_seed), size, first=category) for k in (0, 1))
    a, b = src.objects[0].keypoints, trg.objects[0].keypoints
    ids = [i for i in range(len(a)) if a[i, 2] > 0 and b[i, 2] > 0]
    if len(ids) < 3:
        return None
    return WorldPair(category, src, trg, ids, a[ids, :2].copy(), b[ids, :2].copy())


def world_pairs(split: str, category: str, n: int, size: int = 64, base_seed: int = 0) -> list[WorldPair]:
    """The first `n` usable pairs of `category` in `split` (deterministic)."""
    out: list[WorldPair] = []
    index = 0
    while len(out) < n:
        pair = world_pair(split, category, index, size, base_seed)
        index += 1
        if pair is not None:
            out.append(pair)
        if index > 20 * n + 20:
            raise DiffprobeError(f"could not find {n} {category} pairs with 3 shared visible keypoints")
    return out
