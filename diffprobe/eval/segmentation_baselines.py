"""The label maps a skeptic tries before any model: one segment, top/bottom halves, k-means on pixel colour, and
scikit-image's graph (Felzenszwalb & Huttenlocher) and superpixel (SLIC) segmentations (the `bench` extra).

Each returns an (H, W) int64 map of segment ids, scored like any prediction (diffprobe.eval.segmentation).
"""

from __future__ import annotations

import numpy as np

from diffprobe.errors import DiffprobeError


def one_segment(height: int, width: int) -> np.ndarray:
    """Every pixel in segment 0."""
    return np.zeros((height, width), np.int64)


def top_bottom(height: int, width: int) -> np.ndarray:
    """Segment 0 above the middle row, 1 below (the sky/ground prior of outdoor scenes)."""
    return np.repeat((np.arange(height)[:, None] >= height // 2).astype(np.int64), width, axis=1)


def colour_kmeans(image: np.ndarray, k: int, seed: int = 0, restarts: int = 3, iterations: int = 50) -> np.ndarray:
    """Lloyd's k-means on the RGB values of image (H, W, 3), k-means++ starts, the best of `restarts` runs
    by inertia; returns (H, W) int64 cluster ids. Deterministic for a seed."""
    if k < 1:
        raise DiffprobeError(f"k-means needs k >= 1, got {k}")
    x = np.asarray(image, np.float64).reshape(-1, image.shape[-1])
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centres = _kmeans_pp(x, min(k, len(x)), rng)
        for _ in range(iterations):
            d = ((x[:, None, :] - centres[None]) ** 2).sum(-1)  # (N, k)
            assign = d.argmin(1)
            new = np.stack([x[assign == c].mean(0) if np.any(assign == c) else centres[c]
                            for c in range(len(centres))])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = d[np.arange(len(x)), assign].sum()
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best.reshape(image.shape[:2]).astype(np.int64)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k starting centres (k, C): the first uniform, each next with probability proportional to the
    squared distance to the nearest chosen one."""
    centres = [x[rng.integers(len(x))]]
    d = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d.sum()
        idx = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=d / total)
        centres.append(x[idx])
        d = np.minimum(d, ((x - x[idx]) ** 2).sum(1))
    return np.stack(centres)


def _skimage():
    try:
        import skimage.segmentation
    except ImportError as exc:
        raise DiffprobeError("the Felzenszwalb and SLIC baselines need scikit-image: pip install "
                             "'diffprobe[bench]'") from exc
    return skimage.segmentation


def felzenszwalb(image: np.ndarray, scale: float, sigma: float = 0.8, min_size: int = 20) -> np.ndarray:
    """scikit-image's Felzenszwalb-Huttenlocher graph segmentation of an RGB image (H, W, 3): larger `scale`,
    larger segments; (H, W) int64 ids."""
    return _skimage().felzenszwalb(np.asarray(image), scale=scale, sigma=sigma, min_size=min_size).astype(np.int64)


def slic(image: np.ndarray, segments: int, compactness: float = 10.0) -> np.ndarray:
    """scikit-image's SLIC superpixels of an RGB image (H, W, 3), about `segments` of them (k-means in Lab colour
    and position); (H, W) int64 ids from 0."""
    labels = _skimage().slic(np.asarray(image), n_segments=segments, compactness=compactness, start_label=0)
    return labels.astype(np.int64)
