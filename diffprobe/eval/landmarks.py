"""Landmark evaluation of unsupervised keypoints: a linear regressor to ground truth and the metrics.

Points are (x, y) normalised to [0, 1] of the (processed) image unless a function says otherwise.

    W = fit_regressor(found_train, gt_train, visible_train)   # (2K, 2L), no bias
    pred = apply_regressor(W, found_test)                       # (N, L, 2)
    inter_ocular_error(pred, gt_test)                           # CelebA / MAFL, in % of the eye distance

The regressor follows the reference code: points centred by -0.5, flattened (x, y interleaved),
no bias, W = pinv(X^T X) X^T Y, each target column fit on the rows where its landmark is visible.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from diffprobe.errors import DiffprobeError
from diffprobe.eval.pck import pck, threshold_pixels

# MAFL / CelebA landmark order: left eye, right eye, nose, left mouth corner, right mouth corner
CELEBA_EYES = (0, 1)
WILD_MIN_FACE_FRACTION = 0.3


def _points(x, what: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[-1] != 2:
        raise DiffprobeError(f"{what} must be (N, points, 2), got shape {arr.shape}")
    return arr


def _visible(visible, shape) -> np.ndarray:
    if visible is None:
        return np.ones(shape[:2], bool)
    vis = np.asarray(visible, bool)
    if vis.shape != shape[:2]:
        raise DiffprobeError(f"visibility must be {shape[:2]}, got {vis.shape}")
    return vis


def fit_regressor(found, gt, visible=None) -> np.ndarray:
    """Bias-free least squares from found points (N, K, 2) to ground truth (N, L, 2): W (2K, 2L)."""
    x, y = _points(found, "found points"), _points(gt, "ground-truth points")
    if x.shape[0] != y.shape[0]:
        raise DiffprobeError(f"found points cover {x.shape[0]} images, ground truth {y.shape[0]}")
    vis = _visible(visible, y.shape)
    X = (x - 0.5).reshape(len(x), -1)
    Y = (y - 0.5).reshape(len(y), -1)
    W = np.zeros((X.shape[1], Y.shape[1]))
    for col in range(Y.shape[1]):
        rows = vis[:, col // 2]
        if not rows.any():
            raise DiffprobeError(f"landmark {col // 2} is never visible in the regressor's training images")
        Xr = X[rows]
        W[:, col] = np.linalg.pinv(Xr.T @ Xr) @ Xr.T @ Y[rows, col]
    return W


def apply_regressor(W: np.ndarray, found) -> np.ndarray:
    """Regressed landmarks (N, L, 2) in [0, 1] coordinates from found points (N, K, 2)."""
    x = _points(found, "found points")
    if x.shape[1] * 2 != W.shape[0]:
        raise DiffprobeError(f"regressor expects {W.shape[0] // 2} keypoints, got {x.shape[1]}")
    return ((x - 0.5).reshape(len(x), -1) @ W).reshape(len(x), -1, 2) + 0.5


def inter_ocular_error(pred, gt, eyes: tuple[int, int] = CELEBA_EYES) -> dict:
    """CelebA/MAFL: mean over images of (mean landmark L2 / eye distance), in percent."""
    p, g = _points(pred, "predictions"), _points(gt, "ground truth")
    iod = np.linalg.norm(g[:, eyes[0]] - g[:, eyes[1]], axis=-1)
    if np.any(iod <= 0):
        raise DiffprobeError("an image has coinciding eye landmarks (inter-ocular distance 0)")
    per_image = np.linalg.norm(p - g, axis=-1).mean(axis=1) / iod * 100.0
    return {"inter_ocular_error_percent": float(per_image.mean()), "per_image": per_image}


def wild_mask(face_boxes, image_sizes, min_fraction: float = WILD_MIN_FACE_FRACTION) -> np.ndarray:
    """CelebA "wild": images whose face box (N, 4: x, y, w, h) covers >= min_fraction of the image (N, 2: W, H)."""
    b, s = np.asarray(face_boxes, np.float64), np.asarray(image_sizes, np.float64)
    return b[:, 2] * b[:, 3] >= min_fraction * s[:, 0] * s[:, 1]


def visible_error(pred, gt, visible) -> dict:
    """CUB, as the reference (eval.py, "visible"): per image the mean L2 over its visible keypoints
    (normalised coordinates), then the mean over images with at least one visible keypoint (`mean_l2`,
    x100 in `mean_l2_percent`). `mean_l2_pooled` pools all visible keypoints instead (images with
    many visible parts weigh more); it is not the reference's number."""
    p, g = _points(pred, "predictions"), _points(gt, "ground truth")
    vis = _visible(visible, g.shape)
    counts = vis.sum(axis=1)
    if counts.sum() == 0:
        raise DiffprobeError("no visible keypoint to evaluate")
    d = np.linalg.norm(p - g, axis=-1) * vis
    per_image = d.sum(axis=1)[counts > 0] / counts[counts > 0]
    return {"mean_l2": float(per_image.mean()), "mean_l2_percent": float(per_image.mean() * 100.0),
            "mean_l2_pooled": float(d.sum() / counts.sum()), "num_points": int(counts.sum()),
            "num_images": int((counts > 0).sum()), "per_image": per_image}


def summed_l2(pred, gt, visible=None, size: float = 256.0) -> dict:
    """Tai-Chi-HD: per image, the L2 distances at `size` px summed over visible keypoints; mean over images."""
    p, g = _points(pred, "predictions"), _points(gt, "ground truth")
    vis = _visible(visible, g.shape)
    per_image = (np.linalg.norm(p - g, axis=-1) * size * vis).sum(axis=1)
    return {f"summed_l2_at_{size:g}px": float(per_image.mean()), "per_image": per_image}


def swap_invariant_l2(pred, gt, swap: Sequence[tuple[int, int]], size: float = 128.0) -> dict:
    """Human3.6M: per image, mean L2 x `size`, the smaller of the ground truth as is and with the
    left/right landmark pairs in `swap` exchanged; mean over images."""
    p, g = _points(pred, "predictions"), _points(gt, "ground truth")
    perm = np.arange(g.shape[1])
    for a, b in swap:
        if not (0 <= a < len(perm) and 0 <= b < len(perm)):
            raise DiffprobeError(f"swap pair ({a}, {b}) outside the {len(perm)} landmarks")
        perm[a], perm[b] = b, a
    direct = np.linalg.norm(p - g, axis=-1).mean(axis=1)
    swapped = np.linalg.norm(p - g[:, perm], axis=-1).mean(axis=1)
    per_image = np.minimum(direct, swapped) * size
    return {f"swap_invariant_l2_x{size:g}": float(per_image.mean()), "per_image": per_image}


def deepfashion_pck(pred, gt, visible=None, size: float = 256.0, pixels: float = 6.0) -> dict:
    """DeepFashion: PCK with a fixed `pixels` radius after scaling normalised points to `size` px."""
    p, g = _points(pred, "predictions") * size, _points(gt, "ground truth") * size
    res = pck(p, g, threshold_pixels(pixels), visible=visible)
    return {**res.summary(), "image_size": size}


def mse_height_normalised(pred, gt, image_height, visible=None) -> dict:
    """Seed 003's pose error: the mean squared error of (x, y) pixels divided by the image height, over the
    visible points. pred, gt (N, K, 2) pixels; image_height scalar or (N,)."""
    p, g = _points(pred, "predictions"), _points(gt, "ground truth")
    vis = _visible(visible, g.shape)
    h = np.broadcast_to(np.asarray(image_height, np.float64), (len(g),))[:, None, None]
    if np.any(h <= 0):
        raise DiffprobeError("image heights must be positive")
    sq = (((p - g) / h) ** 2).sum(-1)[vis]
    if sq.size == 0:
        raise DiffprobeError("no visible keypoint to evaluate")
    return {"mse_height_normalised": float(sq.mean()), "num_points": int(sq.size)}
