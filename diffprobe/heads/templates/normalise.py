"""Each keypoint set into a unit box centred at the origin: per axis, (p - centre) / extent, so visible
coordinates lie in [-0.5, 0.5]; the centre and the per-axis extent (the set's scale) are kept."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffprobe.errors import DiffprobeError

MIN_VISIBLE = 2  # a set needs two visible points to have a box


def check_sets(points, visible=None) -> tuple[np.ndarray, np.ndarray]:
    """(points (N, K, 2) float64, visible (N, K) bool), validated: one-line errors for what cannot be used."""
    p = np.asarray(points, dtype=np.float64)
    if p.size == 0 or p.ndim != 3 or p.shape[-1] != 2:
        raise DiffprobeError(f"keypoint sets must be a non-empty (N, K, 2) array, got shape {p.shape}")
    vis = np.ones(p.shape[:2], bool) if visible is None else np.asarray(visible, bool)
    if vis.shape != p.shape[:2]:
        raise DiffprobeError(f"visibility must be {p.shape[:2]} (one flag per keypoint), got {vis.shape}")
    vis = vis & np.isfinite(p).all(-1)
    if not vis.any():
        raise DiffprobeError("every keypoint of every set is invisible: nothing to build templates from")
    return p, vis


@dataclass
class Normalised:
    """points (N, K, 2) in the unit box (invisible entries 0, masked by `visible`); centre (N, 2) and
    extent (N, 2): original = points * extent + centre; usable (N,): sets with at least two visible points."""

    points: np.ndarray
    visible: np.ndarray
    centre: np.ndarray
    extent: np.ndarray
    usable: np.ndarray

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Unit-box points (N, K, 2) back to the sets' own coordinates."""
        return points * self.extent[:, None] + self.centre[:, None]


def normalise(points, visible=None) -> Normalised:
    """Normalise every set by the box of its visible points; an axis with no extent (all points on one line)
    keeps a unit extent, so its coordinates are 0."""
    p, vis = check_sets(points, visible)
    big = np.where(vis[..., None], p, np.nan)
    with np.errstate(all="ignore"):
        lo, hi = np.nanmin(big, axis=1), np.nanmax(big, axis=1)  # (N, 2)
    usable = vis.sum(1) >= MIN_VISIBLE
    centre = np.where(usable[:, None], (lo + hi) / 2, 0.0)
    extent = np.where(usable[:, None] & (hi - lo > 1e-12), hi - lo, 1.0)
    unit = np.where(vis[..., None], (p - centre[:, None]) / extent[:, None], 0.0)
    return Normalised(unit, vis & usable[:, None], centre, extent, usable)
