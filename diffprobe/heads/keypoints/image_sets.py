"""Images (and optional landmarks) as the keypoints head sees them: square tensors of side S.

An item may carry a crop box (e.g. a CUB bird box) applied first; then the image is centre-cropped
to a square (crop="center") or resized whole (crop="none") to S x S. A Frame converts points between
the original image's pixels and the processed image's pixels, both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffprobe.data.images import center_square, image_to_tensor, load_image


@dataclass(frozen=True)
class Frame:
    """processed = (original - offset) * scale, per axis (x, y)."""

    offset: tuple[float, float]
    scale: tuple[float, float]

    def to_processed(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.offset) * self.scale

    def to_original(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) / self.scale + self.offset


@dataclass
class LandmarkItem:
    """One image: path, optional crop box (x0, y0, x1, y1) in its pixels, landmarks (L, 2) x, y in its
    pixels with visibility (L,), and dataset-specific extras."""

    path: Path
    box: tuple[float, float, float, float] | None = None
    keypoints: np.ndarray | None = None
    visible: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


class ImageSet:
    """Items turned into (1, 3, S, S) tensors in [-1, 1] with their Frames; resize: a filter of
    diffprobe.data.images.RESIZE_FILTERS (the reference: PIL bilinear)."""

    def __init__(self, items: list[LandmarkItem], size: int, crop: str = "center", resize: str = "bilinear"):
        self.items, self.size, self.crop, self.resize = list(items), int(size), crop, resize

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int):
        """(tensor (1, 3, S, S), Frame, original size (W, H)) of item i."""
        item = self.items[i]
        img = load_image(item.path)
        size = img.size
        ox, oy = 0.0, 0.0
        if item.box is not None:
            box = tuple(int(round(v)) for v in item.box)
            img, (ox, oy) = img.crop(box), (float(box[0]), float(box[1]))
        w, h = img.size
        if self.crop == "center":
            left, top, side = center_square(w, h)
            frame = Frame((ox + left, oy + top), (self.size / side, self.size / side))
        else:
            frame = Frame((ox, oy), (self.size / w, self.size / h))
        return image_to_tensor(img, self.size, crop=self.crop, resize=self.resize), frame, size

    def tensor(self, i: int) -> torch.Tensor:
        return self.load(i)[0]

    def batch(self, indices: list[int]) -> torch.Tensor:
        """(B, 3, S, S) of several items."""
        return torch.cat([self.tensor(i) for i in indices])

    def landmarks(self, i: int, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth of item i in processed coordinates normalised to [0, 1] (L, 2), and visibility (L,)."""
        item = self.items[i]
        if item.keypoints is None:
            raise ValueError(f"{item.path} has no landmarks")
        vis = np.ones(len(item.keypoints), bool) if item.visible is None else np.asarray(item.visible, bool)
        return frame.to_processed(item.keypoints) / self.size, vis
