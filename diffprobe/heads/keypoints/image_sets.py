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


def image_frame(image_size: tuple[int, int], box: tuple[float, float, float, float] | None, size: int,
                crop: str = "center") -> tuple[Frame, tuple[int, int, int, int] | None]:
    """(Frame, the box in whole pixels or None) of an image of (W, H) = `image_size` cut to `box` (x0, y0, x1, y1)
    when given, then centre-cropped to a square (crop="center") or resized whole (crop="none") to `size`."""
    (w, h), (ox, oy) = image_size, (0.0, 0.0)
    if box is not None:
        box = tuple(int(round(v)) for v in box)
        (ox, oy), w, h = (float(box[0]), float(box[1])), box[2] - box[0], box[3] - box[1]
    if crop == "center":
        left, top, side = center_square(w, h)
        return Frame((ox + left, oy + top), (size / side, size / side)), box
    return Frame((ox, oy), (size / w, size / h)), box


def prepare_image(img, box: tuple[float, float, float, float] | None, size: int, crop: str = "center",
                  resize: str = "bilinear") -> tuple[torch.Tensor, Frame]:
    """(tensor (1, 3, S, S) in [-1, 1], Frame) of a PIL image, as `image_frame` describes (S = `size`)."""
    frame, box = image_frame(img.size, box, size, crop)
    img = img.crop(box) if box is not None else img
    return image_to_tensor(img, size, crop=crop, resize=resize), frame


class ImageSet:
    """Items turned into (1, 3, S, S) tensors in [-1, 1] with their Frames; resize: a filter of
    diffprobe.data.images.RESIZE_FILTERS (the reference: PIL bilinear)."""

    def __init__(self, items: list[LandmarkItem], size: int, crop: str = "center", resize: str = "bilinear"):
        self.items, self.size, self.crop, self.resize = list(items), int(size), crop, resize

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int):
        """(tensor (1, 3, S, S), Frame, original size (W, H)) of item i."""
        img = load_image(self.items[i].path)
        return (*prepare_image(img, self.items[i].box, self.size, self.crop, self.resize), img.size)

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
