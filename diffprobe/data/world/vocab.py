"""The world's vocabulary: classes, colours, keypoint names and their mapping to real dataset labels.

Class ids index `CLASSES` (stuff first, then things). `COCO_FINE` gives each class the 0-based
COCO-Stuff-182 label id written into COCO-Stuff-like label PNGs (255 = unlabeled there).
"""

from __future__ import annotations

STUFF_TOP = ("sky", "wall")
STUFF_BOTTOM = ("grass", "water", "sand", "snow", "road")
STUFF = STUFF_TOP + STUFF_BOTTOM
FIGURES = ("face", "bird", "house")  # categories with parts and named keypoints
SHAPES = ("circle", "square", "triangle")
THINGS = FIGURES + SHAPES
CLASSES = STUFF + THINGS
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}

# 0-based COCO-Stuff-182 ids (stuffthingmaps PNG values): person, bird, house, sports ball, book, kite,
# sky-other, wall-brick, grass, water-other, sand, snow, road.
COCO_FINE = {
    "sky": 156, "wall": 170, "grass": 123, "water": 177, "sand": 153, "snow": 158, "road": 148,
    "face": 0, "bird": 15, "house": 127, "circle": 36, "square": 83, "triangle": 37,
}

COLOURS = {
    "red": (205, 35, 35), "green": (40, 160, 55), "blue": (40, 75, 205), "yellow": (235, 215, 45),
    "orange": (240, 135, 25), "purple": (130, 55, 175), "pink": (240, 135, 185), "white": (240, 240, 240),
    "black": (28, 28, 28), "brown": (120, 75, 35), "grey": (128, 128, 128), "cyan": (40, 200, 210),
}

# Named keypoints per figure category, in the order of the real datasets they are exported to:
# face = CelebA/MAFL's 5 landmarks; bird = CUB-200-2011's 15 parts (parts/parts.txt order).
KEYPOINTS = {
    "face": ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right"),
    "bird": ("back", "beak", "belly", "breast", "crown", "forehead", "left_eye", "left_leg", "left_wing",
             "nape", "right_eye", "right_leg", "right_wing", "tail", "throat"),
    "house": ("roof_apex", "roof_left", "roof_right", "window_left", "window_right", "door",
              "base_left", "base_right"),
}
# Edges between keypoint indices (in KEYPOINTS order) for drawing a set as a skeleton; CelebA's 5 landmarks
# and CUB's 15 parts use the face and bird orders.
SKELETONS = {
    "face": ((0, 1), (0, 2), (1, 2), (2, 3), (2, 4), (3, 4)),
    "bird": ((1, 5), (5, 4), (4, 9), (9, 0), (0, 13), (13, 2), (2, 3), (3, 14), (14, 1), (6, 5), (10, 5),
             (2, 7), (2, 11), (0, 8), (0, 12)),
    "house": ((0, 1), (0, 2), (1, 2), (1, 6), (2, 7), (6, 7), (3, 4), (5, 6), (5, 7)),
}
PARTS = {
    "face": ("head", "eye", "nose", "mouth"),
    "bird": ("body", "head", "beak", "eye", "wing", "tail", "leg"),
    "house": ("wall", "roof", "door", "window"),
    "circle": ("body",), "square": ("body",), "triangle": ("body",),
}
# The parts a close-up's caption names ("a red face with eye nose mouth on grass under sky"): every part but the
# figure's main piece, which its category word already names.
CAPTION_PARTS = {"face": ("eye", "nose", "mouth"), "bird": ("head", "beak", "eye", "wing", "tail", "leg"),
                 "house": ("roof", "door", "window")}
# Global part ids for the part map: 0 = no part (stuff), then (category, part) in this order.
PART_IDS = {(cat, part): i + 1 for i, (cat, part) in enumerate((c, p) for c in THINGS for p in PARTS[c])}

TEXTURES = ("flat", "stripes", "checks", "noise")

# Words the caption grammar uses besides class and colour names.
GRAMMAR_WORDS = ("a", "and", "on", "under", "by", "with")


def vocabulary() -> list[str]:
    """Every word a world caption can contain, sorted (the tokenizer gives each one token)."""
    parts = {p for names in CAPTION_PARTS.values() for p in names}
    return sorted(set(CLASSES) | set(COLOURS) | set(GRAMMAR_WORDS) | parts)
