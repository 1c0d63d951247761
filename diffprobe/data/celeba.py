"""CelebA / MAFL reader for the standard release layout (files at the root or in Anno/, Eval/, Img/).

    img_align_celeba/000001.jpg ...          aligned faces (variant "aligned"); img_align_celeba_png/000001.png,
                                             the lossless release the reference reads, is used when present
    img_celeba/000001.jpg ...                in-the-wild images (variant "wild")
    list_landmarks_align_celeba.txt          count line, header line, "<name> x1 y1 ... x5 y5" (aligned)
    list_landmarks_celeba.txt                same for the wild images
    list_bbox_celeba.txt                     count line, header, "<name> x y width height" (wild images)
    list_eval_partition.txt                  "<name> <0 train | 1 val | 2 test>"
    MAFL/training.txt, MAFL/testing.txt      image names of the MAFL split (19,000 / 1,000)

Landmarks (5, 2) are (x, y) pixels in the order left eye, right eye, nose, left and right mouth corner.
Splits: "all"; "train" / "val" / "test" (CelebA partition); "mafl_train" / "mafl_test"; "unsupervised"
(every image except the MAFL test images: what keypoints are discovered on). The "wild" variant keeps
only images whose face box covers at least `min_face_fraction` (0.3) of the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffprobe.data.annotation_files import parse_numbers, read_rows, require_file
from diffprobe.errors import DiffprobeError
from diffprobe.eval.landmarks import wild_mask

SPLITS = ("all", "train", "val", "test", "mafl_train", "mafl_test", "unsupervised")
VARIANTS = {"aligned": ("img_align_celeba", "list_landmarks_align_celeba.txt"),
            "wild": ("img_celeba", "list_landmarks_celeba.txt")}
LANDMARK_NAMES = ("left eye", "right eye", "nose", "left mouth", "right mouth")


@dataclass(frozen=True)
class CelebaRecord:
    """One image: landmarks (5, 2) x, y pixels; face_box (4,) x, y, w, h (wild variant, else None)."""

    name: str
    path: Path
    landmarks: np.ndarray
    face_box: np.ndarray | None = None


def _find(root: Path, name: str, required: bool = True) -> Path | None:
    for folder in ("", "Anno", "Eval", "Img", "MAFL"):
        cand = root / folder / name if folder else root / name
        if cand.exists():
            return cand
    if required:
        raise DiffprobeError(f"CelebA: {name} not found in {root} (nor in its Anno/, Eval/, Img/ folders)")
    return None


def _named_rows(path: Path, ncols: int, skip: int) -> dict[str, list[float]]:
    return {f[0]: parse_numbers(path, ln, f[1 : ncols + 1]) for ln, f in read_rows(require_file(path, "CelebA"), ncols + 1, skip)}


def _name_list(path: Path) -> set[str]:
    return {f[0] for _, f in read_rows(require_file(path, "CelebA/MAFL"), 1)}


class CelebaDataset:
    """Records of one split and variant, sorted by file name."""

    def __init__(self, root: str | Path, split: str = "all", variant: str = "aligned",
                 min_face_fraction: float = 0.3):
        if split not in SPLITS:
            raise DiffprobeError(f"CelebA: split must be one of {SPLITS}, got {split!r}")
        if variant not in VARIANTS:
            raise DiffprobeError(f"CelebA: variant must be one of {tuple(VARIANTS)}, got {variant!r}")
        self.root, self.split, self.variant = Path(root), split, variant
        folder, landmark_file = VARIANTS[variant]
        png = _find(self.root, folder + "_png", required=False) if variant == "aligned" else None
        images = png or _find(self.root, folder)
        lm_path = _find(self.root, landmark_file)
        landmarks = _named_rows(lm_path, 10, skip=2)
        names = sorted(landmarks)
        names = [n for n in names if n in self._split_names(split, names)]
        boxes = _named_rows(_find(self.root, "list_bbox_celeba.txt"), 4, skip=2) if variant == "wild" else {}
        self.records: list[CelebaRecord] = []
        for n in names:
            box = None
            if variant == "wild":
                if n not in boxes:
                    raise DiffprobeError(f"CelebA: {n} has no face box in list_bbox_celeba.txt")
                box = np.asarray(boxes[n], np.float64)
                if not self._face_covers(images / n, box, min_face_fraction):
                    continue
            path = images / (Path(n).stem + ".png" if png else n)
            self.records.append(CelebaRecord(n, path, np.asarray(landmarks[n], np.float64).reshape(5, 2), box))

    def _split_names(self, split: str, names: list[str]) -> set[str]:
        if split == "all":
            return set(names)
        if split in ("train", "val", "test"):
            part = _named_rows(_find(self.root, "list_eval_partition.txt"), 1, skip=0)
            want = ("train", "val", "test").index(split)
            return {n for n, (p,) in part.items() if int(p) == want}
        mafl = self.root / "MAFL" if (self.root / "MAFL").is_dir() else self.root
        if split == "mafl_train":
            return _name_list(mafl / "training.txt")
        test = _name_list(mafl / "testing.txt")
        return test if split == "mafl_test" else set(names) - test

    @staticmethod
    def _face_covers(path: Path, box: np.ndarray, fraction: float) -> bool:
        from PIL import Image

        try:
            with Image.open(path) as img:          # reads the header only
                w, h = img.size
        except OSError as exc:
            raise DiffprobeError(f"CelebA: cannot read {path} ({exc})") from None
        return bool(wild_mask(box[None], [(w, h)], fraction)[0])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> CelebaRecord:
        return self.records[i]

    def __iter__(self):
        return iter(self.records)
