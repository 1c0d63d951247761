"""Which images task=keypoints works on: a folder, CelebA/MAFL or CUB-200-2011 (conf/data/*.yaml).

Each split becomes a list of LandmarkItem (path, optional crop box, landmarks in original pixels).
"""

from __future__ import annotations

from typing import Any

from diffprobe.data.images import list_images
from diffprobe.errors import DiffprobeError
from diffprobe.heads.keypoints.image_sets import LandmarkItem

DATASETS = ("folder", "celeba", "cub")


def with_defaults(data: Any) -> dict:
    """The data config as a dict, the shipped conf/data/<name>.yaml filling the keys it leaves out or null (the
    defaults live there only; a benchmark may pass a few keys as a dict)."""
    from importlib import resources

    from omegaconf import OmegaConf

    given = OmegaConf.to_container(data, resolve=True) if OmegaConf.is_config(data) else dict(data)
    shipped = resources.files("diffprobe.conf") / "data" / f"{given.get('name')}.yaml"
    defaults = OmegaConf.to_container(OmegaConf.load(str(shipped))) if shipped.is_file() else {}
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def split_items(data: Any, role: str) -> list[LandmarkItem]:
    """Items of the split the data config names for `role`: "fit", "train" (regressor) or "test"."""
    if data is None:
        raise DiffprobeError("task=keypoints needs data: data=PATH (a folder of images), data=celeba or data=cub "
                             "with data.root=PATH")
    data = with_defaults(data)
    name, root = data.get("name"), data.get("root")
    if name not in DATASETS:
        raise DiffprobeError(f"task=keypoints reads data {DATASETS}, not {name!r}")
    if root is None:
        raise DiffprobeError(f"data={name} needs data.root=PATH")
    if name == "folder":
        if role != "fit":
            raise DiffprobeError("mode=eval needs ground-truth landmarks: use data=celeba or data=cub with data.root=PATH")
        return [LandmarkItem(p) for p in list_images(root)]
    split = data.get(f"{role}_split")
    if name == "celeba":
        from diffprobe.data.celeba import CelebaDataset

        ds = CelebaDataset(root, split, variant=data["variant"], min_face_fraction=float(data["min_face_fraction"]))
        return [LandmarkItem(r.path, None, r.landmarks, None, {"name": r.name}) for r in ds]
    from diffprobe.data.cub import CubDataset, square_box

    ds = CubDataset(root, split, classes=data.get("classes"))
    crop, margin = bool(data["crop_to_box"]), float(data["box_margin"])
    return [LandmarkItem(r.path, square_box(r.bbox, margin) if crop else None, r.keypoints, r.visible,
                         {"image_id": r.image_id}) for r in ds]
