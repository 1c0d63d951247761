"""PCK (percentage of correct keypoints) with explicitly named distance thresholds.

A predicted point is correct when its Euclidean distance to the ground truth is at most a threshold.
The threshold always comes with a name saying what it was normalised by, because "PCK@0.1" means
different things in different papers (image side, object box side, torso diagonal, fixed pixels):

    thr = threshold_image_max_side(h, w, alpha=0.1)      # "PCK@0.1_img"
    res = pck(pred, gt, thr, visible=mask)
    res.per_point      # pooled over all valid points
    res.per_image      # one value per image (NaN where an image has no valid point)

Points are (x, y) in pixels. Arrays may be numpy or torch (CPU) tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffprobe.errors import DiffprobeError


@dataclass(frozen=True)
class Threshold:
    """A correctness radius in pixels and the name of its normaliser.

    value: scalar, (B,) one per image, or (B, N) one per point. name: short tag such as "0.1_img".
    """

    value: np.ndarray
    name: str


def _array(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise DiffprobeError(f"{what} contains NaN or infinite values")
    return arr


def _alpha(alpha: float) -> float:
    if not alpha > 0:
        raise DiffprobeError(f"PCK alpha must be positive, got {alpha}")
    return float(alpha)


def threshold_image_max_side(h, w, alpha: float = 0.1) -> Threshold:
    """alpha * max(h, w) of the (target) image; h, w scalars or (B,) arrays. Name "<alpha>_img"."""
    a = _alpha(alpha)
    side = np.maximum(_array(h, "image height"), _array(w, "image width"))
    return Threshold(a * side, f"{a:g}_img")


def threshold_bbox_max_side(box, alpha: float = 0.1) -> Threshold:
    """alpha * max(box width, box height) of the target object's box (x0, y0, x1, y1); box (4,) or (B, 4)."""
    a = _alpha(alpha)
    b = _array(box, "bounding box")
    if b.shape[-1] != 4:
        raise DiffprobeError(f"a bounding box is (x0, y0, x1, y1), got shape {tuple(b.shape)}")
    side = np.maximum(b[..., 2] - b[..., 0], b[..., 3] - b[..., 1])
    if np.any(side <= 0):
        raise DiffprobeError("a bounding box has zero or negative size (expected x1 > x0 or y1 > y0)")
    return Threshold(a * side, f"{a:g}_bbox")


def threshold_pixels(px: float) -> Threshold:
    """A fixed radius in pixels (e.g. DeepFashion PCK@6px at 256 x 256). Name "<px>px"."""
    if not px > 0:
        raise DiffprobeError(f"a pixel threshold must be positive, got {px}")
    return Threshold(np.asarray(float(px)), f"{px:g}px")


def threshold_box_diagonal(box, alpha: float = 0.2) -> Threshold:
    """alpha * the diagonal of the object's box (x0, y0, x1, y1); box (4,) or (B, 4). Name "<alpha>_boxdiag"
    (seed 003's PCK@0.2 where there is no torso)."""
    a = _alpha(alpha)
    b = _array(box, "bounding box")
    diag = np.hypot(b[..., 2] - b[..., 0], b[..., 3] - b[..., 1])
    if np.any(diag <= 0):
        raise DiffprobeError("a bounding box has no extent (its diagonal is 0)")
    return Threshold(a * diag, f"{a:g}_boxdiag")


def threshold_torso_diagonal(left_shoulder, right_hip, alpha: float = 0.2) -> Threshold:
    """alpha * distance from left shoulder to right hip (x, y); points (2,) or (B, 2). Name "<alpha>_torso"."""
    a = _alpha(alpha)
    d = np.linalg.norm(_array(left_shoulder, "left shoulder") - _array(right_hip, "right hip"), axis=-1)
    if np.any(d <= 0):
        raise DiffprobeError("the torso diagonal is zero (left shoulder and right hip coincide)")
    return Threshold(a * d, f"{a:g}_torso")


@dataclass
class PCKResult:
    """Per-point outcome of one PCK evaluation.

    correct, valid, distances: (B, N); thresholds: (B, N) radius used for each point in pixels.
    Invalid (invisible/unannotated) points are neither correct nor counted.
    """

    correct: np.ndarray
    valid: np.ndarray
    distances: np.ndarray
    thresholds: np.ndarray
    name: str

    @property
    def num_points(self) -> int:
        return int(self.valid.sum())

    @property
    def per_point(self) -> float:
        """Fraction of all valid points that are correct, pooled over images (NaN when none is valid)."""
        n = self.valid.sum()
        return float(self.correct.sum() / n) if n else float("nan")

    @property
    def per_image(self) -> np.ndarray:
        """(B,) fraction of correct valid points in each image; NaN for an image with no valid point."""
        n = self.valid.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, self.correct.sum(axis=1) / np.maximum(n, 1), np.nan)

    @property
    def mean_per_image(self) -> float:
        """Mean over images of the per-image PCK (images without valid points skipped)."""
        v = self.per_image
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else float("nan")

    def summary(self) -> dict:
        """JSON-ready numbers, named: {"pck@0.1_img_per_point": ..., "..._per_image": ..., "num_points": ...}."""
        return {
            f"pck@{self.name}_per_point": self.per_point,
            f"pck@{self.name}_per_image": self.mean_per_image,
            "num_points": self.num_points,
            "num_images": int(self.correct.shape[0]),
            "threshold": self.name,
        }


def pck(pred, gt, threshold: Threshold, visible=None) -> PCKResult:
    """PCK of predicted against ground-truth points.

    pred, gt: (N, 2) for one image or (B, N, 2), (x, y) pixels. threshold: a `Threshold` (scalar,
    (B,) or (B, N)). visible: optional bool mask (N,) or (B, N); points outside it are ignored.
    """
    if not isinstance(threshold, Threshold):
        raise DiffprobeError("pck needs a named Threshold, e.g. threshold_image_max_side(h, w, 0.1)")
    p, g = _array(pred, "predicted points"), _array(gt, "ground-truth points")
    if p.shape != g.shape or p.shape[-1] != 2 or p.ndim not in (2, 3):
        raise DiffprobeError(
            f"pred and gt must both be (N, 2) or (B, N, 2); got {tuple(p.shape)} and {tuple(g.shape)}"
        )
    if p.ndim == 2:
        p, g = p[None], g[None]
    B, N = p.shape[:2]
    vis = np.ones((B, N), bool) if visible is None else np.asarray(visible, bool).reshape(-1, N)
    if vis.shape[0] == 1 and B > 1:
        vis = np.broadcast_to(vis, (B, N))
    if vis.shape != (B, N):
        raise DiffprobeError(f"visible mask has shape {vis.shape}, expected {(B, N)}")
    thr = np.asarray(threshold.value, np.float64)
    if thr.ndim == 1:
        thr = thr[:, None]
    try:
        thr = np.broadcast_to(thr, (B, N)).copy()
    except ValueError:
        raise DiffprobeError(f"threshold of shape {np.shape(threshold.value)} does not fit {B} images") from None
    dist = np.linalg.norm(p - g, axis=-1)
    correct = (dist <= thr) & vis
    return PCKResult(correct=correct, valid=vis.copy(), distances=dist, thresholds=thr, name=threshold.name)


class PCKCounts:
    """PCK pooled over the images of a dataset as per-image counts (their states add up over shards).

    update(i, result) records image i from a one-image PCKResult; result() gives the pooled numbers:
    per point (all valid points), per image (mean of each image's PCK), counts and the threshold name.
    """

    def __init__(self, n: int):
        self.correct, self.valid = np.zeros(n), np.zeros(n)
        self.name: str | None = None

    def update(self, i: int, result: PCKResult) -> None:
        if self.name is not None and result.name != self.name:
            raise DiffprobeError(f"cannot pool PCK@{result.name} with PCK@{self.name}")
        self.name = result.name
        self.correct[i], self.valid[i] = result.correct.sum(), result.valid.sum()

    def state(self) -> dict[str, np.ndarray]:
        return {"correct": self.correct, "valid": self.valid}

    def load_state(self, state: dict[str, np.ndarray], name: str | None = None) -> None:
        self.correct, self.valid = (np.asarray(state[k], np.float64).copy() for k in ("correct", "valid"))
        self.name = name or self.name

    def result(self) -> dict:
        """{"pck@<name>_per_point", "pck@<name>_per_image", "num_points", "num_images"} (NaN when empty)."""
        seen = self.valid > 0
        n = self.valid.sum()
        return {f"pck@{self.name}_per_point": float(self.correct.sum() / n) if n else float("nan"),
                f"pck@{self.name}_per_image": float((self.correct[seen] / self.valid[seen]).mean())
                if seen.any() else float("nan"),
                "num_points": int(n), "num_images": int(seen.sum())}
