"""Weakly-supervised object localisation metrics (Choe et al., "Evaluating Weakly Supervised Object
Localization Methods Right", CVPR 2020).

A heat map (H, W) is min-max normalised to [0, 1] and thresholded at every value of THRESHOLDS (0, 0.01,
..., 0.99); each connected component (8-connectivity) of the mask gives a box. Boxes are (x0, y0, x1, y1)
in pixels with x1, y1 exclusive (a one-pixel box at column 3 is (3, y, 4, y + 1)).

- GT-known Loc: at the best threshold, the share of images whose largest component's box has IoU >= 0.5
  with a ground-truth box (the class is given: "GT-known").
- MaxBoxAccV2: for each IoU level delta in (0.3, 0.5, 0.7), the best threshold's share of images with any
  component box at IoU >= delta with any ground-truth box; the mean over the three levels.
- PxAP: where ground-truth masks exist, the area under the pixel precision-recall curve, pooled over all
  pixels of all images.
"""

from __future__ import annotations

import numpy as np

from diffprobe.errors import DiffprobeError

THRESHOLDS = np.round(np.arange(0, 1, 0.01), 2)
IOU_LEVELS = (0.3, 0.5, 0.7)


def normalise_heat(heat) -> np.ndarray:
    """(H, W) float64 min-max normalised to [0, 1] (a constant map becomes zeros)."""
    h = np.asarray(heat, np.float64)
    if h.ndim != 2:
        raise DiffprobeError(f"a heat map must be (H, W), got shape {h.shape}")
    if not np.isfinite(h).all():
        raise DiffprobeError("the heat map holds NaN or infinite values")
    lo, hi = h.min(), h.max()
    return (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)


def box_iou(a, b) -> np.ndarray:
    """(N, M) IoU of boxes a (N, 4) and b (M, 4), (x0, y0, x1, y1) with exclusive x1, y1."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def component_boxes(mask) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (K, 4), pixel areas (K,)) of the 8-connected components of a boolean mask (H, W)."""
    import cv2

    n, _, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, np.uint8), connectivity=8)
    s = stats[1:]
    boxes = np.stack([s[:, 0], s[:, 1], s[:, 0] + s[:, 2], s[:, 1] + s[:, 3]], 1).astype(np.float64)
    return boxes.reshape(-1, 4), s[:, 4].astype(np.int64)


def largest_box(mask) -> np.ndarray | None:
    """The box (4,) of the largest component of a mask, None if the mask is empty."""
    boxes, areas = component_boxes(mask)
    return boxes[int(areas.argmax())] if len(boxes) else None


class WSOLMeter:
    """Accumulates GT-known Loc, MaxBoxAccV2 and PxAP over images; `update` one heat map at a time."""

    def __init__(self, thresholds=THRESHOLDS):
        self.thresholds = np.asarray(thresholds, np.float64)
        t = len(self.thresholds)
        self.images = 0
        self.largest_hits = np.zeros(t)                   # largest box IoU >= 0.5, per threshold
        self.any_hits = np.zeros((t, len(IOU_LEVELS)))    # any box IoU >= delta, per threshold and level
        self.fg = np.zeros(t)                             # ground-truth pixels with heat >= threshold
        self.bg = np.zeros(t)                             # other pixels with heat >= threshold
        self.fg_total = 0.0
        self.masks = 0

    def update(self, heat, gt_boxes, gt_mask=None) -> None:
        """heat (H, W); gt_boxes (G, 4) (any of them counts); gt_mask (H, W) bool or None."""
        h = normalise_heat(heat)
        gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
        if len(gt) == 0:
            raise DiffprobeError("an image without a ground-truth box cannot be scored for localisation")
        for k, thr in enumerate(self.thresholds):
            boxes, areas = component_boxes(h >= thr)
            if not len(boxes):
                continue
            ious = box_iou(boxes, gt).max(axis=1)
            self.largest_hits[k] += ious[int(areas.argmax())] >= 0.5
            self.any_hits[k] += ious.max() >= np.asarray(IOU_LEVELS)
        if gt_mask is not None:
            m = np.asarray(gt_mask, bool)
            if m.shape != h.shape:
                raise DiffprobeError(f"the mask {m.shape} and the heat map {h.shape} differ in size")
            above = h[None] >= self.thresholds[:, None, None]
            self.fg += (above & m).sum(axis=(1, 2))
            self.bg += (above & ~m).sum(axis=(1, 2))
            self.fg_total += m.sum()
            self.masks += 1
        self.images += 1

    def state(self) -> dict[str, np.ndarray]:
        return {"images": np.array([self.images]), "largest_hits": self.largest_hits, "any_hits": self.any_hits,
                "fg": self.fg, "bg": self.bg, "fg_total": np.array([self.fg_total]), "masks": np.array([self.masks])}

    def load_state(self, state: dict) -> None:
        self.images, self.masks = int(state["images"][0]), int(state["masks"][0])
        self.fg_total = float(state["fg_total"][0])
        for key in ("largest_hits", "any_hits", "fg", "bg"):
            setattr(self, key, np.asarray(state[key], np.float64).copy())

    def gt_known_at(self, threshold: float) -> float:
        """GT-known Loc (%) at one fixed mask threshold (the nearest of the meter's thresholds), e.g. one chosen
        on val: what a user gets, where gt_known_loc is the best threshold's."""
        if self.images == 0:
            raise DiffprobeError("no image was scored")
        return float(100 * self.largest_hits[int(np.abs(self.thresholds - threshold).argmin())] / self.images)

    def result(self) -> dict:
        """gt_known_loc, max_box_acc_v2, max_box_acc@{0.3,0.5,0.7} (in %, with their best thresholds), pxap (%)."""
        if self.images == 0:
            raise DiffprobeError("no image was scored")
        out = {"images": self.images}
        best = int(self.largest_hits.argmax())
        out.update(gt_known_loc=100 * self.largest_hits[best] / self.images, gt_known_threshold=float(self.thresholds[best]))
        accs = []
        for j, delta in enumerate(IOU_LEVELS):
            k = int(self.any_hits[:, j].argmax())
            accs.append(100 * self.any_hits[k, j] / self.images)
            out[f"max_box_acc@{delta}"] = accs[-1]
            out[f"max_box_acc@{delta}_threshold"] = float(self.thresholds[k])
        out["max_box_acc_v2"] = float(np.mean(accs))
        if self.masks:
            out["pxap"] = 100 * pixel_average_precision(self.fg, self.bg, self.fg_total)
        return out


def pixel_average_precision(fg: np.ndarray, bg: np.ndarray, fg_total: float) -> float:
    """Average precision from the pixels above each (ascending) threshold: fg (T,) ground-truth pixels,
    bg (T,) others, fg_total all ground-truth pixels. Going from the highest threshold down, each gain in
    recall is weighted by the precision where it is reached (sum of (R_i - R_{i-1}) P_i)."""
    if fg_total <= 0:
        raise DiffprobeError("no ground-truth pixel: PxAP is undefined")
    fg, bg = np.asarray(fg, np.float64)[::-1], np.asarray(bg, np.float64)[::-1]
    precision = np.where(fg + bg > 0, fg / np.maximum(fg + bg, 1e-12), 1.0)
    recall = np.concatenate([[0.0], fg / fg_total])
    return float(np.sum(np.diff(recall) * precision))
