"""Image pairs with corresponding points: the record every correspondence reader returns, and a
generic JSON format for your own data.

The format (the same keys as the Diffusion Hyperfeatures authors' annotation files, so their
`spair_71k_test-360.json` reads as is)::

    [
      {"source_path": "cats/a.jpg", "target_path": "cats/b.jpg",
       "source_points": [[x, y], ...], "target_points": [[x, y], ...],   # pixels of the original images
       "category": "cat",                                                # optional
       "source_bounding_box": [x0, y0, x1, y1],                          # optional
       "target_bounding_box": [x0, y0, x1, y1]}                          # optional; needed for PCK@bbox
    ]

The top level may also be {"pairs": [...]}. Paths are relative to `image_root` (default: the JSON
file's folder); a file not found there is also looked for under `<image_root>/<category>/` (the
SPair-71k JPEGImages layout). Point i of the source corresponds to point i of the target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffprobe.errors import DiffprobeError


@dataclass(frozen=True)
class CorrespondencePair:
    """source/target image paths; *_points (N, 2) float (x, y) pixels of the original images, row i
    of each in correspondence; *_bbox (4,) x0, y0, x1, y1 or None; name: an id for reports."""

    source: Path
    target: Path
    source_points: np.ndarray
    target_points: np.ndarray
    category: str = ""
    source_bbox: np.ndarray | None = None
    target_bbox: np.ndarray | None = None
    name: str = ""

    def __post_init__(self) -> None:
        s, t = self.source_points, self.target_points
        if s.ndim != 2 or s.shape[1] != 2 or s.shape != t.shape:
            raise DiffprobeError(f"pair {self.name or self.source}: source and target points must both be (N, 2), "
                                 f"got {s.shape} and {t.shape}")
        if s.shape[0] == 0:
            raise DiffprobeError(f"pair {self.name or self.source} has no corresponding points")


def points_array(value, what: str) -> np.ndarray:
    """A list of [x, y] -> (N, 2) float array, with a clear error otherwise."""
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise DiffprobeError(f"{what}: expected a list of [x, y] points, got {str(value)[:60]}") from None
    if not np.all(np.isfinite(arr)):
        raise DiffprobeError(f"{what}: points must be finite numbers")
    return arr


def box_array(value, what: str) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (4,) or arr[2] <= arr[0] or arr[3] <= arr[1]:
        raise DiffprobeError(f"{what}: a box is [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {list(value)}")
    return arr


def _resolve(root: Path, rel: str, category: str, where: str) -> Path:
    for cand in (root / rel, root / category / rel):
        if cand.is_file():
            return cand
    raise DiffprobeError(f"{where}: image {rel!r} not found under {root}" + (f" or {root / category}" if category else ""))


def read_pairs_json(path: str | Path, image_root: str | Path | None = None) -> list[CorrespondencePair]:
    """Read the pairs JSON format above; every image must exist."""
    path = Path(path)
    if not path.is_file():
        raise DiffprobeError(f"pairs file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DiffprobeError(f"{path} is not valid JSON ({exc})") from None
    if isinstance(data, dict):
        data = data.get("pairs")
    if not isinstance(data, list) or not data:
        raise DiffprobeError(f"{path}: expected a non-empty list of pairs (or {{\"pairs\": [...]}})")
    root = Path(image_root) if image_root is not None else path.parent
    pairs = []
    for i, ann in enumerate(data):
        where = f"{path} pair {i}"
        if not isinstance(ann, dict):
            raise DiffprobeError(f"{where}: expected an object")
        missing = [k for k in ("source_path", "target_path", "source_points", "target_points") if k not in ann]
        if missing:
            raise DiffprobeError(f"{where}: missing {', '.join(missing)}")
        category = str(ann.get("category", ""))
        pairs.append(CorrespondencePair(
            source=_resolve(root, ann["source_path"], category, where),
            target=_resolve(root, ann["target_path"], category, where),
            source_points=points_array(ann["source_points"], f"{where} source_points"),
            target_points=points_array(ann["target_points"], f"{where} target_points"),
            category=category,
            source_bbox=box_array(ann.get("source_bounding_box"), f"{where} source_bounding_box"),
            target_bbox=box_array(ann.get("target_bounding_box"), f"{where} target_bounding_box"),
            name=str(ann.get("name", f"{i:06d}")),
        ))
    return pairs
