"""Unsupervised segmentation metrics: confusion matrices, Hungarian matching, pixel accuracy, mIoU.

Three matching protocols, named in every result:
- "per_image" (the DiffSeg reference): each image's predicted segments are matched to classes by
  linear_sum_assignment on that image's confusion matrix; TP/FP/FN are accumulated over the
  dataset. Segments beyond the class count stay unmatched: their pixels count as FN of their true
  class and as FP of no class. Lenient: every image gets its own best relabelling.
- "per_object" (image mean): each image matched on its own, then that image's IoU averaged over the classes
  present in it, and those image means averaged: every object counts as much as the stuff around it, and
  merging two of an image's classes costs that image a class (the accumulated protocols weigh classes by
  pixels, so large stuff regions dominate). Its pixel accuracy is the image mean of matched pixels.
- "dataset" (PiCIE/STEGO): one confusion matrix over the whole dataset and one matching. Only
  meaningful when predicted ids mean the same thing in every image (e.g. word labels, clusters).
Scores: pixel accuracy = sum TP / labelled pixels; IoU_c = TP / (TP + FP + FN); mIoU = mean over
classes with a defined IoU (nanmean, as the reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from diffprobe.errors import DiffprobeError

IGNORE = 255


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int, num_pred: int | None = None,
                     ignore: int = IGNORE) -> np.ndarray:
    """(num_classes, P) counts of pixels with true class c (rows) and predicted id p (columns).

    P = max(num_classes, num_pred or pred.max() + 1). Pixels whose label is `ignore` or outside
    0..num_classes-1 are skipped. Predictions must be non-negative integers.
    """
    label = np.asarray(label).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    if label.shape != pred.shape:
        raise DiffprobeError(f"label and prediction sizes differ: {label.size} vs {pred.size} pixels")
    if pred.size and pred.min() < 0:
        raise DiffprobeError("predicted ids must be non-negative")
    cols = max(num_classes, num_pred or 0, int(pred.max()) + 1 if pred.size else 0)
    keep = (label != ignore) & (label >= 0) & (label < num_classes)
    counts = np.bincount(label[keep] * cols + pred[keep], minlength=num_classes * cols)
    return counts.reshape(num_classes, cols)


def match_counts(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian matching (maximising matched pixels) of classes (rows) to predicted ids (columns);
    returns per-class TP, FP, FN, each (num_classes,)."""
    rows, cols = linear_sum_assignment(hist, maximize=True)
    tp = np.zeros(hist.shape[0], dtype=np.float64)
    fp = np.zeros_like(tp)
    tp[rows] = hist[rows, cols]
    fp[rows] = hist[:, cols].sum(axis=0) - hist[rows, cols]
    fn = hist.sum(axis=1) - tp
    return tp, fp, fn


def scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, total: float) -> dict:
    """pixel_accuracy and mIoU (in [0, 1]) and the per-class IoU list (NaN for classes never seen)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
    return {
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "iou": [None if np.isnan(v) else float(v) for v in iou],
    }


@dataclass
class PerImageHungarian:
    """The reference protocol: match each image on its own, accumulate TP/FP/FN."""

    num_classes: int
    tp: np.ndarray = field(init=False)
    fp: np.ndarray = field(init=False)
    fn: np.ndarray = field(init=False)
    total: float = 0.0
    images: int = 0

    def __post_init__(self):
        self.tp, self.fp, self.fn = (np.zeros(self.num_classes) for _ in range(3))

    def update(self, label: np.ndarray, pred: np.ndarray) -> None:
        hist = confusion_matrix(label, pred, self.num_classes)
        tp, fp, fn = match_counts(hist)
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.total += hist.sum()
        self.images += 1

    def result(self) -> dict:
        return {"matching": "per_image", "images": self.images, **scores(self.tp, self.fp, self.fn, self.total)}

    def state(self) -> dict[str, np.ndarray]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "total": np.array([self.total]),
                "images": np.array([self.images])}

    def load_state(self, state: dict) -> None:
        self.tp, self.fp, self.fn = (np.asarray(state[k], dtype=np.float64).copy() for k in ("tp", "fp", "fn"))
        self.total, self.images = float(state["total"][0]), int(state["images"][0])


@dataclass
class PerObjectHungarian:
    """Each image matched on its own; the mean over images of its mean IoU over its present classes and of its
    matched pixel fraction."""

    num_classes: int
    miou_sum: float = 0.0
    accuracy_sum: float = 0.0
    images: int = 0

    def update(self, label: np.ndarray, pred: np.ndarray) -> None:
        hist = confusion_matrix(label, pred, self.num_classes)
        present = hist.sum(axis=1) > 0
        if not present.any():
            return
        tp, fp, fn = match_counts(hist)
        self.miou_sum += float(np.mean(tp[present] / (tp + fp + fn)[present]))
        self.accuracy_sum += float(tp.sum() / hist.sum())
        self.images += 1

    def result(self) -> dict:
        n = self.images or float("nan")
        return {"matching": "per_object", "images": self.images, "pixel_accuracy": self.accuracy_sum / n,
                "miou": self.miou_sum / n}

    def state(self) -> dict[str, np.ndarray]:
        return {"sums": np.array([self.miou_sum, self.accuracy_sum]), "images": np.array([self.images])}

    def load_state(self, state: dict) -> None:
        self.miou_sum, self.accuracy_sum = (float(v) for v in state["sums"])
        self.images = int(state["images"][0])


@dataclass
class DatasetHungarian:
    """PiCIE/STEGO protocol: one confusion matrix over the dataset (classes x predicted ids, the
    id range grows as needed) and one matching at the end."""

    num_classes: int
    hist: np.ndarray = field(init=False)
    images: int = 0

    def __post_init__(self):
        self.hist = np.zeros((self.num_classes, self.num_classes), dtype=np.float64)

    def update(self, label: np.ndarray, pred: np.ndarray) -> None:
        hist = confusion_matrix(label, pred, self.num_classes, num_pred=self.hist.shape[1])
        if hist.shape[1] > self.hist.shape[1]:
            self.hist = np.pad(self.hist, ((0, 0), (0, hist.shape[1] - self.hist.shape[1])))
        self.hist += hist
        self.images += 1

    def result(self) -> dict:
        tp, fp, fn = match_counts(self.hist)
        return {"matching": "dataset", "images": self.images, **scores(tp, fp, fn, self.hist.sum())}

    def state(self) -> dict[str, np.ndarray]:
        return {"hist": self.hist, "images": np.array([self.images])}

    def load_state(self, state: dict) -> None:
        self.hist = np.asarray(state["hist"], dtype=np.float64).copy()
        self.images = int(state["images"][0])


@dataclass
class SegmentCount:
    """Mean number of predicted segments per image (ids present in the prediction, ignored pixels included)."""

    total: float = 0.0
    images: int = 0

    def update(self, label: np.ndarray, pred: np.ndarray) -> None:
        self.total += len(np.unique(pred))
        self.images += 1

    def result(self) -> dict:
        return {"segments_per_image": self.total / self.images if self.images else float("nan")}

    def state(self) -> dict[str, np.ndarray]:
        return {"total": np.array([self.total]), "images": np.array([self.images])}

    def load_state(self, state: dict) -> None:
        self.total, self.images = float(state["total"][0]), int(state["images"][0])
