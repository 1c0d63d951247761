"""A keypoint set fitted to its nearest template: per axis a scale and an offset (x = s_x t_x + o_x,
y = s_y t_y + o_y), then the residual per point.

The fit is robust (least median of squares): every pair of visible points gives an exact fit; the pair
whose fit has the smallest median residual wins. Points farther from it than OUTLIER_FACTOR robust
standard deviations (1.4826 (1 + 5 / (n - 2)) x the median residual over n visible points; the factor
corrects for the two points every pair fits exactly) and OUTLIER_FLOOR of the set's box diagonal are
outliers (occluded, mislocalised); least squares on the others gives the final fit. The nearest template
is the one with the smallest median residual. Every invisible or outlying point can be replaced by the fit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffprobe.errors import DiffprobeError
from diffprobe.heads.templates.normalise import check_sets

OUTLIER_FACTOR = 3.0      # residual above this many robust standard deviations of the set's residuals ...
OUTLIER_FLOOR = 0.2       # ... and above this fraction of the set's box diagonal (PCK@0.2 counts it wrong)


@dataclass
class TemplateFit:
    """template (N,), scale (N, 2), offset (N, 2): the fit of each set; fitted (N, K, 2) the template placed
    on each set; residual (N, K) distances of visible points to it (NaN where invisible); outlier (N, K);
    filled (N, K, 2): the sets with invisible and outlying points replaced by the fit; rms (N,)."""

    template: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    fitted: np.ndarray
    residual: np.ndarray
    outlier: np.ndarray
    filled: np.ndarray
    rms: np.ndarray


def _axis_fit(t: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted least squares of p = s t + o over the points with weight w (0/1)."""
    n = w.sum()
    if n < 2 or np.ptp(t[w > 0]) < 1e-9:
        return 1.0, float((p * w).sum() / max(n, 1)) if n else 0.0
    a = np.stack([t, np.ones_like(t)], 1) * w[:, None]
    (s, o), *_ = np.linalg.lstsq(a, p * w, rcond=None)
    return float(s), float(o)


def _place(template: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sx, ox = _axis_fit(template[:, 0], p[:, 0], w)
    sy, oy = _axis_fit(template[:, 1], p[:, 1], w)
    scale, offset = np.array([sx, sy]), np.array([ox, oy])
    return scale, offset, template * scale + offset


def _pair_fits(templates: np.ndarray, p: np.ndarray, visible: np.ndarray):
    """Least median of squares per template: (median residual (T,), scale (T, 2), offset (T, 2)) of the best
    exact fit through a pair of visible points of p (K, 2) to each template (T, K, 2)."""
    idx = np.flatnonzero(visible)
    a, b = np.triu_indices(len(idx), 1)
    a, b = idx[a], idx[b]
    dt = templates[:, a] - templates[:, b]                                  # (T, P, 2)
    solvable = np.abs(dt) > 1e-9
    scale = np.where(solvable, (p[a] - p[b]) / np.where(solvable, dt, 1.0), 1.0)
    offset = p[a] - scale * templates[:, a]                                 # (T, P, 2)
    placed = templates[:, None] * scale[:, :, None] + offset[:, :, None]    # (T, P, K, 2)
    med = np.median(np.linalg.norm(placed - p, axis=-1)[..., visible], axis=-1)  # (T, P)
    best = med.argmin(axis=1)
    rows = np.arange(len(templates))
    return med[rows, best], scale[rows, best], offset[rows, best]


def robust_place(template: np.ndarray, p: np.ndarray, visible: np.ndarray, diag: float):
    """(scale, offset, placed (K, 2), residual (K,), outlier (K,) bool) of one set on one template."""
    med, scale, offset = _pair_fits(template[None], p, visible)
    res = np.linalg.norm(template * scale[0] + offset[0] - p, axis=1)
    n = int(visible.sum())
    sigma = 1.4826 * (1 + 5 / max(n - 2, 1)) * float(med[0])   # Rousseeuw's small-sample correction
    outlier = visible & (res > max(OUTLIER_FACTOR * sigma, OUTLIER_FLOOR * diag))
    scale, offset, placed = _place(template, p, (visible & ~outlier).astype(float))
    return scale, offset, placed, np.linalg.norm(placed - p, axis=1), outlier


def fit_to_templates(templates: np.ndarray, points, visible=None) -> TemplateFit:
    """Fit every set (N, K, 2) to the template (T, K, 2) with the lowest robust score."""
    p, vis = check_sets(points, visible)
    templates = np.asarray(templates, np.float64)
    if templates.ndim != 3 or templates.shape[1:] != p.shape[1:]:
        raise DiffprobeError(f"templates have {templates.shape[1]} keypoints, the sets {p.shape[1]}: they do not fit "
                             "(templates are made from sets with the same keypoints)")
    out = {name: [] for name in ("template", "scale", "offset", "fitted", "residual", "outlier", "rms")}
    for i in range(len(p)):
        if vis[i].sum() < 2:
            raise DiffprobeError(f"keypoint set {i} has {int(vis[i].sum())} visible points; a fit needs two")
        diag = max(float(np.hypot(*np.ptp(p[i][vis[i]], axis=0))), 1e-9)
        t = int(np.argmin(_pair_fits(templates, p[i], vis[i])[0]))  # the template with the best robust fit
        scale, offset, placed, res, outlier = robust_place(templates[t], p[i], vis[i], diag)
        keep = vis[i] & ~outlier
        rms = float(np.sqrt((res[keep] ** 2).mean()))
        for name, v in zip(out, (t, scale, offset, placed, np.where(vis[i], res, np.nan), outlier, rms)):
            out[name].append(v)
    arrays = {name: np.array(v) for name, v in out.items()}
    good = vis & ~arrays["outlier"]
    filled = np.where(good[..., None], p, arrays["fitted"])
    return TemplateFit(filled=filled, **arrays)
