"""Cityscapes val (500 images) with the 27 classes of label ids 7..33 (others ignored), as DiffSeg/STEGO.

Standard layout under data.root:
    ROOT/leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
"""

from __future__ import annotations

from pathlib import Path

from diffprobe.data.labelled_images import LabelledImage, LabelledImageSet, lookup_table, require_dir
from diffprobe.errors import DiffprobeError

CLASS_NAMES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider",
    "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
FIRST_ID = 7  # label id 7 (road) is class 0, ..., 33 (bicycle) is class 26
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


class Cityscapes27(LabelledImageSet):
    """Cityscapes images of one split (default val), sorted by city and file name."""

    name = "cityscapes"
    class_names = CLASS_NAMES
    lut = lookup_table({FIRST_ID + c: c for c in range(len(CLASS_NAMES))})

    def __init__(self, root: str | Path, split: str = "val"):
        root = Path(root)
        images = require_dir(root / "leftImg8bit" / split, "Cityscapes", "leftImg8bit_trainvaltest.zip, unpacked")
        labels = require_dir(root / "gtFine" / split, "Cityscapes", "gtFine_trainvaltest.zip, unpacked")
        items = []
        for path in sorted(images.glob(f"*/*{IMAGE_SUFFIX}")):
            name = path.name[: -len(IMAGE_SUFFIX)]
            items.append(LabelledImage(name, path, labels / path.parent.name / f"{name}{LABEL_SUFFIX}"))
        if not items:
            raise DiffprobeError(f"Cityscapes: no *{IMAGE_SUFFIX} files under {images}/<city>/")
        super().__init__(items)
