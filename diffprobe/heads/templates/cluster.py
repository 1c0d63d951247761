"""Templates: k-means with Euclidean distance on the visible normalised coordinates (seed 003: K = 14).

The distance of a set to a template is the mean squared distance over the set's visible points (so sets
with a point missing compare fairly); a template's point is the mean over its members where visible.
k-means++ starts, the best of `restarts` runs by inertia, deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffprobe.errors import DiffprobeError
from diffprobe.heads.templates.normalise import Normalised


@dataclass
class Templates:
    """points (T, K, 2) in the unit box, frequency (T,) share of the sets, assignment (N,) template of each
    usable set (-1 for an unusable one), distance (N,) mean squared distance to it, inertia (sum of them)."""

    points: np.ndarray
    frequency: np.ndarray
    assignment: np.ndarray
    distance: np.ndarray
    inertia: float


def set_distances(points: np.ndarray, visible: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """(N, T) mean squared distance over each set's visible points to each template (points (N, K, 2))."""
    diff = points[:, None] - templates[None]                       # (N, T, K, 2)
    sq = (diff ** 2).sum(-1) * visible[:, None]                     # (N, T, K)
    return sq.sum(-1) / np.maximum(visible.sum(-1), 1)[:, None]


def _means(points, visible, assign, old: np.ndarray) -> np.ndarray:
    out = old.copy()
    for t in range(len(old)):
        members = assign == t
        counts = visible[members].sum(0)                            # (K,)
        sums = (points[members] * visible[members][..., None]).sum(0)
        seen = counts > 0
        out[t, seen] = sums[seen] / counts[seen, None]
    return out


def fit_templates(norm: Normalised, k: int = 14, seed: int = 0, restarts: int = 4, iterations: int = 100) -> Templates:
    """k templates of the usable normalised sets."""
    idx = np.flatnonzero(norm.usable)
    if k < 1:
        raise DiffprobeError(f"the number of templates must be at least 1, got {k}")
    if k > len(idx):
        raise DiffprobeError(f"cannot make {k} templates from {len(idx)} usable keypoint sets (each needs two "
                             "visible points); lower templates.k")
    pts, vis = norm.points[idx], norm.visible[idx]
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        centres = pts[[int(rng.integers(len(pts)))]]
        while len(centres) < k:  # k-means++
            d = set_distances(pts, vis, centres).min(1)
            total = d.sum()
            pick = int(rng.integers(len(pts))) if total <= 0 else int(rng.choice(len(pts), p=d / total))
            centres = np.concatenate([centres, pts[[pick]]])
        assign = None
        for _ in range(iterations):
            d = set_distances(pts, vis, centres)
            new = d.argmin(1)
            if assign is not None and np.array_equal(new, assign):
                break
            assign = new
            centres = _means(pts, vis, assign, centres)
        d = set_distances(pts, vis, centres)
        inertia = float(d[np.arange(len(pts)), assign].sum())
        if best is None or inertia < best[0]:
            best = (inertia, centres, assign, d[np.arange(len(pts)), assign])
    inertia, centres, assign, dist = best
    order = np.argsort(-np.bincount(assign, minlength=k), kind="stable")  # most frequent template first
    rank = np.empty(k, int)
    rank[order] = np.arange(k)
    assignment, distance = np.full(len(norm.points), -1), np.full(len(norm.points), np.nan)
    assignment[idx], distance[idx] = rank[assign], dist
    freq = np.bincount(rank[assign], minlength=k) / len(idx)
    return Templates(centres[order], freq, assignment, distance, inertia)
