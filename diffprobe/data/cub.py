"""CUB-200-2011 reader for the standard release layout.

    CUB_200_2011/
      images.txt                 "<image_id> <relative path under images/>"
      images/<class dir>/<file>.jpg
      classes.txt                "<class_id> <class name>"
      image_class_labels.txt     "<image_id> <class_id>"
      train_test_split.txt       "<image_id> <1 = train, 0 = test>"
      bounding_boxes.txt         "<image_id> <x> <y> <width> <height>"   (pixels)
      parts/part_locs.txt        "<image_id> <part_id> <x> <y> <visible>" (pixels, 15 parts)
      parts/parts.txt            "<part_id> <part name>"                  (optional)

Usage::

    ds = CubDataset(root, split="test")        # root: CUB_200_2011/ or the folder that holds it
    rec = ds[0]                                 # CubRecord: path, class_id, bbox, keypoints (15, 2), visible (15,)
    img = ds.load_image(0)                      # RGB PIL image
    box = square_box(rec.bbox, margin=0.1)      # (x0, y0, x1, y1) square around the bird
    groups = ds.by_class()                      # {class_id: [dataset indices]}, e.g. to build same-class pairs

Keypoints are (x, y) in pixels of the original image exactly as stored in part_locs.txt; parts that
are not visible have visible False (their stored coordinates are 0 and must not be used).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffprobe.data.annotation_files import parse_numbers, read_rows, require_file
from diffprobe.errors import DiffprobeError

NUM_PARTS = 15
SPLITS = ("train", "test", "all")
DEFAULT_PART_NAMES = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
    "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat",
)


@dataclass(frozen=True)
class CubRecord:
    """One annotated image. bbox: (4,) x, y, width, height; keypoints: (15, 2) x, y; visible: (15,) bool."""

    image_id: int
    path: Path
    class_id: int
    is_train: bool
    bbox: np.ndarray
    keypoints: np.ndarray
    visible: np.ndarray


def find_cub_root(root: str | Path) -> Path:
    """The folder holding images.txt: `root` itself or `root/CUB_200_2011`."""
    root = Path(root)
    for cand in (root, root / "CUB_200_2011"):
        if (cand / "images.txt").is_file():
            return cand
    raise DiffprobeError(f"CUB-200-2011: no images.txt in {root} or {root / 'CUB_200_2011'}")


def _id_table(path: Path, ncols: int, kind=float) -> dict[int, list]:
    out = {}
    for lineno, fields in read_rows(require_file(path, "CUB-200-2011"), ncols + 1):
        out[parse_numbers(path, lineno, fields[:1], int)[0]] = parse_numbers(path, lineno, fields[1 : ncols + 1], kind)
    return out


def _name_table(path: Path) -> dict[int, str]:
    return {int(f[0]): " ".join(f[1:]) for _, f in read_rows(require_file(path, "CUB-200-2011"), 2)}


class CubDataset:
    """Records of one split ("train", "test" or "all"), ordered by image id; optional class filter (ids)."""

    def __init__(self, root: str | Path, split: str = "all", classes: list[int] | None = None):
        if split not in SPLITS:
            raise DiffprobeError(f"CUB-200-2011: split must be one of {SPLITS}, got {split!r}")
        self.root = find_cub_root(root)
        self.split = split
        paths = _name_table(self.root / "images.txt")
        labels = _id_table(self.root / "image_class_labels.txt", 1, int)
        is_train = _id_table(self.root / "train_test_split.txt", 1, int)
        boxes = _id_table(self.root / "bounding_boxes.txt", 4)
        self.class_names = _name_table(self.root / "classes.txt")
        parts_file = self.root / "parts" / "parts.txt"
        names = _name_table(parts_file) if parts_file.is_file() else dict(enumerate(DEFAULT_PART_NAMES, 1))
        self.part_names = [names[i] for i in sorted(names)]
        kpts, vis = self._read_parts(self.root / "parts" / "part_locs.txt")
        wanted = set(classes) if classes is not None else None
        self.records: list[CubRecord] = []
        for image_id in sorted(paths):
            for table, what in ((labels, "class label"), (is_train, "train/test flag"), (boxes, "bounding box")):
                if image_id not in table:
                    raise DiffprobeError(f"CUB-200-2011: image {image_id} has no {what}")
            train = bool(is_train[image_id][0])
            if (split == "train" and not train) or (split == "test" and train):
                continue
            cls = labels[image_id][0]
            if wanted is not None and cls not in wanted:
                continue
            self.records.append(CubRecord(
                image_id=image_id, path=self.root / "images" / paths[image_id], class_id=cls, is_train=train,
                bbox=np.asarray(boxes[image_id], dtype=np.float64),
                keypoints=kpts.get(image_id, np.zeros((NUM_PARTS, 2))),
                visible=vis.get(image_id, np.zeros(NUM_PARTS, dtype=bool)),
            ))

    @staticmethod
    def _read_parts(path: Path) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        kpts: dict[int, np.ndarray] = {}
        vis: dict[int, np.ndarray] = {}
        for lineno, fields in read_rows(require_file(path, "CUB-200-2011"), 5):
            image_id, part_id = parse_numbers(path, lineno, fields[:2], int)
            x, y, v = parse_numbers(path, lineno, fields[2:5])
            if not 1 <= part_id <= NUM_PARTS:
                raise DiffprobeError(f"{path}:{lineno}: part id {part_id} outside 1..{NUM_PARTS}")
            kpts.setdefault(image_id, np.zeros((NUM_PARTS, 2)))[part_id - 1] = (x, y)
            vis.setdefault(image_id, np.zeros(NUM_PARTS, dtype=bool))[part_id - 1] = v > 0
        return kpts, vis

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> CubRecord:
        return self.records[i]

    def __iter__(self):
        return iter(self.records)

    def load_image(self, i: int):
        """The RGB PIL image of record i."""
        from diffprobe.data.images import load_image

        return load_image(self.records[i].path)

    def by_class(self) -> dict[int, list[int]]:
        """Dataset indices grouped by class id, in dataset order."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, rec in enumerate(self.records):
            groups[rec.class_id].append(i)
        return dict(groups)


def square_box(bbox: np.ndarray, margin: float = 0.0) -> tuple[float, float, float, float]:
    """Square (x0, y0, x1, y1) centred on a CUB box (x, y, w, h), side max(w, h) * (1 + 2 * margin).

    It may extend past the image; PIL's crop pads with black there.
    """
    x, y, w, h = (float(v) for v in bbox)
    side = max(w, h) * (1.0 + 2.0 * margin)
    cx, cy = x + w / 2.0, y + h / 2.0
    return (cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0)
