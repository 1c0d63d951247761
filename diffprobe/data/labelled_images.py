"""Shared parts of the segmentation dataset readers: records, label PNGs, class remapping, cropping."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffprobe.data.images import center_square, load_image
from diffprobe.errors import DiffprobeError

IGNORE = 255


@dataclass(frozen=True)
class LabelledImage:
    """One image with its dense label file."""

    name: str
    image_path: Path
    label_path: Path


def lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """uint8 table of `size` entries sending every raw id to its class (0..), all others to IGNORE."""
    lut = np.full(size, IGNORE, dtype=np.uint8)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


def read_label(path: Path, lut: np.ndarray) -> np.ndarray:
    """(H, W) uint8 classes of a single-channel label PNG through `lut` (255 = ignore)."""
    if not path.is_file():
        raise DiffprobeError(f"missing label file {path}")
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise DiffprobeError(f"{path}: expected a single-channel label PNG, got mode {img.mode}")
        raw = np.asarray(img).astype(np.int64)
    if raw.min() < 0 or raw.max() >= len(lut):
        raise DiffprobeError(f"{path}: label ids outside 0..{len(lut) - 1}")
    return lut[raw]


class LabelledImageSet:
    """Indexable list of LabelledImage; `load(i)` -> (RGB PIL image, (H, W) uint8 classes)."""

    name = "labelled images"
    class_names: tuple[str, ...] = ()
    lut: np.ndarray

    def __init__(self, items: list[LabelledImage]):
        self.items = items

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> LabelledImage:
        return self.items[i]

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        item = self.items[i]
        image, label = load_image(item.image_path), read_label(item.label_path, self.lut)
        if label.shape != (image.height, image.width):
            raise DiffprobeError(f"{item.label_path}: label is {label.shape[1]}x{label.shape[0]}, "
                                 f"image is {image.width}x{image.height}")
        return image, label


def center_crop_label(label: np.ndarray, size: int) -> np.ndarray:
    """Centre square of `label` (same box as data.images.center_square), resized to size x size by
    nearest neighbour, as the reference evaluates."""
    left, top, side = center_square(label.shape[1], label.shape[0])
    crop = Image.fromarray(label[top:top + side, left:left + side])
    return np.asarray(crop.resize((size, size), Image.NEAREST))


def require_dir(path: Path, dataset: str, hint: str) -> Path:
    if not path.is_dir():
        raise DiffprobeError(f"{dataset}: missing folder {path} ({hint})")
    return path
