"""COCO-Stuff-27 (val): the curated list of 2,175 val2017 images, 182 fine classes mapped to 27 coarse.

Layouts accepted under data.root (the first that exists is used):

    ROOT/Coco164kFull_Stuff_Coarse_7.txt    the curated image list (2,175 ids, one per line)
    ROOT/val2017/<id>.jpg                   COCO val2017 images
    ROOT/annotation_val2017/<id>.png        stuffthingmaps_trainval2017/val2017, renamed (DiffSeg reference)
or the PiCIE/STEGO layout:
    ROOT/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt
    ROOT/images/val2017/<id>.jpg
    ROOT/annotations/val2017/<id>.png

The list is not derivable offline: it is the IIC/PiCIE file the reference ships as
data/coco/Coco164kFull_Stuff_Coarse_7.txt; copy it into ROOT (or set list_file). Label PNGs hold
the fine id (COCO category id - 1, 0..181) per pixel, 255 unlabelled.
"""

from __future__ import annotations

from pathlib import Path

from diffprobe.data.labelled_images import LabelledImage, LabelledImageSet, lookup_table, require_dir
from diffprobe.errors import DiffprobeError

LIST_NAME = "Coco164kFull_Stuff_Coarse_7.txt"
CURATED_SIZE = 2175

# 27 coarse classes (12 thing then 15 stuff supercategories, IIC order) and the fine ids of each.
COARSE_TO_FINE: dict[str, tuple[int, ...]] = {
    "electronic": (71, 72, 73, 74, 75, 76),
    "appliance": (77, 78, 79, 80, 81, 82),
    "food-things": tuple(range(51, 61)),
    "furniture-things": tuple(range(61, 71)),
    "indoor": tuple(range(83, 91)),
    "kitchen": tuple(range(43, 51)),
    "accessory": tuple(range(25, 33)),
    "animal": tuple(range(15, 25)),
    "outdoor": tuple(range(9, 15)),
    "person": (0,),
    "sports": tuple(range(33, 43)),
    "vehicle": tuple(range(1, 9)),
    "ceiling": (101, 102),
    "floor": (100, 113, 114, 115, 116, 117),
    "food-stuff": (120, 121, 152, 169),
    "furniture-stuff": (97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164),
    "raw-material": (99, 131, 138, 142),
    "textile": (91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167),
    "wall": tuple(range(170, 177)),
    "window": (179, 180),
    "building": (94, 95, 127, 150, 157, 165),
    "ground": (110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158),
    "plant": (93, 96, 118, 123, 128, 133, 141, 162, 168),
    "sky": (105, 156),
    "solid": (126, 134, 149, 159, 161, 181),
    "structural": (98, 112, 137, 145, 163),
    "water": (119, 147, 154, 177, 178),
}
FINE_TO_COARSE = {fine: c for c, fines in enumerate(COARSE_TO_FINE.values()) for fine in fines}

LAYOUTS = (  # (list file, image folder, label folder), relative to the root
    (LIST_NAME, "val2017", "annotation_val2017"),
    (f"curated/val2017/{LIST_NAME}", "images/val2017", "annotations/val2017"),
)


def read_id_list(path: Path) -> list[str]:
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [i for i in ids if not i.isdigit()]
    if bad:
        raise DiffprobeError(f"{path}: not an image id list (first bad line: {bad[0]!r})")
    return ids


class CocoStuff27(LabelledImageSet):
    """COCO-Stuff-27 curated val images. list_file: override the curated list (e.g. a subset)."""

    name = "coco_stuff27"
    class_names = tuple(COARSE_TO_FINE)
    lut = lookup_table(FINE_TO_COARSE)

    def __init__(self, root: str | Path, list_file: str | Path | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DiffprobeError(f"COCO-Stuff-27: data.root {root} is not a folder")
        layout = next((lay for lay in LAYOUTS if (root / lay[0]).is_file()), None)
        if list_file is None and layout is None:
            raise DiffprobeError(f"COCO-Stuff-27: no {LIST_NAME} in {root} or {root / 'curated/val2017'}; copy the "
                                 "curated list shipped with the DiffSeg/PiCIE code there (see docs/diffseg.md)")
        layout = layout or next((lay for lay in LAYOUTS if (root / lay[1]).is_dir()), LAYOUTS[0])
        ids = read_id_list(Path(list_file) if list_file is not None else root / layout[0])
        images = require_dir(root / layout[1], "COCO-Stuff-27", "COCO val2017 images")
        labels = require_dir(root / layout[2], "COCO-Stuff-27", "stuffthingmaps val2017 label PNGs")
        super().__init__([LabelledImage(i, images / f"{i}.jpg", labels / f"{i}.png") for i in ids])
        if list_file is None and len(ids) != CURATED_SIZE and not (root / "world.json").is_file():  # world: any size
            raise DiffprobeError(f"COCO-Stuff-27: {root / layout[0]} lists {len(ids)} images, the curated list has "
                                 f"{CURATED_SIZE}; pass data.list_file= to evaluate on a subset on purpose")
