"""Which images task=keypoints works on: a folder, CelebA/MAFL or CUB-200-2011 (conf/data/*.yaml).

Each split becomes a list of LandmarkItem (path, optional crop box, landmarks in original pixels).
"""

from __future__ import annotations

from typing import Any

from diffprobe.data.images import list_images
from diffprobe.errors import DiffprobeError
from diffprobe.heads.keypoints.image_sets import LandmarkItem

DATASETS = ("folder", "celeba", "cub")


def _get(data: Any, key: str, default=None):
    value = data.get(key, default) if hasattr(data, "get") else getattr(data, key, default)
    return default if value is None else value


def split_items(data: Any, role: str) -> list[LandmarkItem]:
    """Items of the split the data config names for `role`: "fit", "train" (regressor) or "test"."""
    if data is None:
        raise DiffprobeError("task=keypoints needs data: data=PATH (a folder of images), data=celeba or data=cub "
                             "with data.root=PATH")
    name, root = _get(data, "name"), _get(data, "root")
    if name not in DATASETS:
        raise DiffprobeError(f"task=keypoints reads data {DATASETS}, not {name!r}")
    if root is None:
        raise DiffprobeError(f"data={name} needs data.root=PATH")
    if name == "folder":
        if role != "fit":
            raise DiffprobeError("mode=eval needs ground-truth landmarks: use data=celeba or data=cub with data.root=PATH")
        return [LandmarkItem(p) for p in list_images(root)]
    split = _get(data, f"{role}_split")
    if name == "celeba":
        from diffprobe.data.celeba import CelebaDataset

        ds = CelebaDataset(root, split, variant=_get(data, "variant", "aligned"),
                           min_face_fraction=float(_get(data, "min_face_fraction", 0.3)))
        return [LandmarkItem(r.path, None, r.landmarks, None, {"name": r.name}) for r in ds]
    from diffprobe.data.cub import CubDataset, square_box

    ds = CubDataset(root, split, classes=_get(data, "classes"))
    crop = bool(_get(data, "crop_to_box", True))
    margin = float(_get(data, "box_margin", 0.0))
    return [LandmarkItem(r.path, square_box(r.bbox, margin) if crop else None, r.keypoints, r.visible,
                         {"image_id": r.image_id}) for r in ds]
