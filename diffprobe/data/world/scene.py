"""Sample and render one world scene from a seed, with exact ground truth.

Pixel coordinates: x to the right, y down, pixel (i, j) covers [j, j+1) x [i, i+1); masks are evaluated
at pixel centres (j + 0.5, i + 0.5). A keypoint (x, y) is visible when it lies in the image, the pixel
containing it belongs to its object in the instance map (not occluded), and the figure does not hide it
itself (a bird's far eye and wing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffprobe.data.world import figures, paint
from diffprobe.data.world.vocab import (CAPTION_PARTS, CLASS_ID, COLOURS, KEYPOINTS, PART_IDS, STUFF_BOTTOM,
                                        STUFF_TOP, TEXTURES, THINGS)
from diffprobe.errors import DiffprobeError

SPLITS = {"train": 0, "val": 1, "test": 2}
MIN_SIZE = 64
_ROTATION = {"face": 0.35, "bird": 0.3, "house": 0.15}  # max |angle| in radians; shapes turn freely
_SCALE = {"face": (0.11, 0.17), "bird": (0.1, 0.15), "house": (0.11, 0.16)}  # pixels per unit / size
_SHAPE_SCALE = (0.09, 0.16)
# close-ups, as aligned datasets crop them (CelebA/MAFL faces, CUB birds): the figure fills about half to
# most of the frame, roughly centred
_CLOSEUP_SCALE = {"face": (0.22, 0.34), "bird": (0.17, 0.27), "house": (0.22, 0.34)}
_CLOSEUP_CENTRE = (0.44, 0.56)


@dataclass
class WorldObject:
    """One object: its words, pose, keypoints (K, 3) as x, y, visible, and visible bounding box."""

    instance: int
    category: str
    colour: str
    texture: str
    pose: dict
    keypoints: np.ndarray
    keypoint_names: tuple[str, ...]
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the visible mask
    area: int  # visible pixels

    def to_dict(self) -> dict:
        return {"instance": self.instance, "category": self.category, "colour": self.colour,
                "texture": self.texture, "pose": self.pose, "bbox": list(self.bbox), "area": self.area,
                "keypoints": {n: [float(x), float(y), int(v)] for n, (x, y, v) in
                              zip(self.keypoint_names, self.keypoints)}}


@dataclass
class Scene:
    """image (H, W, 3) uint8; instance (H, W) int32, 0 = stuff; classes (H, W) uint8 ids into CLASSES;
    parts (H, W) uint8 ids of PART_IDS (0 = stuff)."""

    seed: int
    image: np.ndarray
    instance: np.ndarray
    classes: np.ndarray
    parts: np.ndarray
    objects: list[WorldObject]
    stuff: tuple[str, str]  # (top, bottom)
    caption: str
    # per object: {"colour": i, "category": j} word indices, and for a close-up "parts": {part name: word index}
    words: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "caption": self.caption, "stuff": list(self.stuff), "words": self.words,
                "objects": [o.to_dict() for o in self.objects]}


def scene_seed(split: str, index: int, base_seed: int = 0) -> int:
    """The seed of image `index` of a split; splits never share a seed for any base seed."""
    if split not in SPLITS:
        raise DiffprobeError(f"unknown world split {split!r}; choose one of {', '.join(SPLITS)}")
    return int(np.random.SeedSequence([base_seed, SPLITS[split], index]).generate_state(1, np.uint64)[0] >> 1)


def _pose_matrix(scale: float, angle: float, aspect: float, shear: float, flipped: bool) -> np.ndarray:
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([scale * aspect * (-1 if flipped else 1),
                                                                  scale / aspect])


def _sample_pose(rng: np.random.Generator, category: str, size: int, closeup: bool = False,
                 shrink: float = 1.0) -> dict:
    lo, hi = _CLOSEUP_SCALE[category] if closeup else _SCALE.get(category, _SHAPE_SCALE)
    max_angle = _ROTATION.get(category)
    pose = {"scale": float(rng.uniform(lo, hi) * size * shrink),
            "angle": float(rng.uniform(-max_angle, max_angle) if max_angle else rng.uniform(0, 2 * np.pi)),
            "aspect": float(np.exp(rng.uniform(-0.15, 0.15))), "shear": float(rng.uniform(-0.15, 0.15)),
            "flipped": bool(category == "bird" and rng.random() < 0.5)}
    cx, cy = ((rng.uniform(*_CLOSEUP_CENTRE), rng.uniform(*_CLOSEUP_CENTRE)) if closeup else
              (rng.uniform(0.18, 0.82), rng.uniform(0.2, 0.85)))
    pose["center"] = [float(cx * size), float(cy * size)]
    return pose


def _fits(fig: figures.Figure, mat: np.ndarray, center: np.ndarray, size: int) -> bool:
    x0, y0, x1, y1 = fig.extent
    corners = mat @ np.array([[x0, x1, x0, x1], [y0, y0, y1, y1]]) + center[:, None]
    return bool(corners.min() >= -0.08 * size and corners.max() <= 1.08 * size)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, str]]:
    top, bottom = STUFF_TOP[rng.integers(len(STUFF_TOP))], STUFF_BOTTOM[rng.integers(len(STUFF_BOTTOM))]
    xs = np.arange(size) + 0.5
    horizon = size * (rng.uniform(0.3, 0.6) + rng.uniform(0, 0.06) * np.sin(2 * np.pi * rng.uniform(0.5, 2)
                                                                              * xs / size + rng.uniform(0, 6)))
    lower = (np.arange(size)[:, None] + 0.5) >= horizon[None, :]
    img = np.where(lower[..., None], paint.stuff(bottom, rng, size, size), paint.stuff(top, rng, size, size))
    classes = np.where(lower, CLASS_ID[bottom], CLASS_ID[top]).astype(np.uint8)
    return img, classes, (top, bottom)


def render_scene(seed: int, size: int = 64, first: str | None = None, max_objects: int = 3,
                 closeup: bool = False) -> Scene:
    """Render the scene of `seed`; `first` forces the category of the first object (for pairs).

    closeup: one figure of category `first` (face, bird or house), large and roughly centred (it fills
    about half to most of the frame, as aligned datasets crop them), on the same stuff background.
    """
    if size < MIN_SIZE:
        raise DiffprobeError(f"world images must be at least {MIN_SIZE} px, got size={size}")
    if first is not None and first not in THINGS:
        raise DiffprobeError(f"unknown world category {first!r}; choose one of {', '.join(THINGS)}")
    if closeup:
        if first not in _CLOSEUP_SCALE:
            raise DiffprobeError(f"close-ups show a figure ({', '.join(_CLOSEUP_SCALE)}), not {first!r}")
        max_objects = 1
    rng = np.random.default_rng(seed)
    img, classes, stuff_names = _background(rng, size)
    instance = np.zeros((size, size), np.int32)
    parts = np.zeros((size, size), np.uint8)
    n_obj = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25])) if max_objects >= 3 else max_objects
    cats = [str(c) for c in rng.permutation([c for c in THINGS if c != first])]
    cats = ([first] if first else []) + cats
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    pix = np.stack([xs.ravel(), ys.ravel()])
    placed: list[tuple[figures.Figure, dict, str, str, np.ndarray, int]] = []
    for k in range(n_obj):
        cat, colour = cats[k], colours[k]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        for attempt in range(25):  # a close-up that does not fit is drawn again a little smaller
            pose = _sample_pose(rng, cat, size, closeup, shrink=0.97 ** attempt if closeup else 1.0)
            fig = figures.build(cat, rng, pose["flipped"])
            mat = _pose_matrix(pose["scale"], pose["angle"], pose["aspect"], pose["shear"], pose["flipped"])
            center = np.asarray(pose["center"])
            if not _fits(fig, mat, center, size):
                continue
            local = np.linalg.solve(mat, pix - center[:, None])
            masks = [p.shape.inside(local[0], local[1]).reshape(size, size) for p in fig.pieces]
            amodal = np.logical_or.reduce(masks)
            if all(((inst_mask & ~amodal).sum() >= max(0.5 * area, 12)) for *_, inst_mask, area in placed):
                break
        else:
            continue
        inst_id = len(placed) + 1
        base = paint.named_colour(rng, colour)
        for piece, m in zip(fig.pieces, masks):
            if piece.role == "main":
                img[m] = paint.fill(texture, base, local[0][m.ravel()], local[1][m.ravel()], rng)
            else:
                img[m] = paint.role_colour(piece.role, base, piece.accent)
            parts[m] = PART_IDS[(cat, piece.part)]
        instance[amodal] = inst_id
        classes[amodal] = CLASS_ID[cat]
        placed = [(f, p, c, t, inst_mask & ~amodal, a) for f, p, c, t, inst_mask, a in placed]
        placed.append((fig, pose, colour, texture, amodal, int(amodal.sum())))
    objects = [_ground_truth(i + 1, fig, pose, colour, texture, instance)
               for i, (fig, pose, colour, texture, *_rest) in enumerate(placed)]
    shown = _caption_parts(placed[0][0].category, parts) if closeup and placed else ()
    caption, words = _caption(objects, stuff_names, shown)
    return Scene(seed, np.clip(np.rint(img), 0, 255).astype(np.uint8), instance, classes, parts, objects,
                 stuff_names, caption, words)


def _ground_truth(inst_id: int, fig: figures.Figure, pose: dict, colour: str, texture: str,
                  instance: np.ndarray) -> WorldObject:
    size = instance.shape[0]
    mat = _pose_matrix(pose["scale"], pose["angle"], pose["aspect"], pose["shear"], pose["flipped"])
    names = KEYPOINTS.get(fig.category, ())
    kps = np.zeros((len(names), 3), np.float64)
    for i, name in enumerate(names):
        x, y = mat @ np.asarray(fig.keypoints[name]) + np.asarray(pose["center"])
        inside = 0 <= x < size and 0 <= y < size
        visible = inside and instance[int(y), int(x)] == inst_id and name not in fig.self_hidden
        kps[i] = (x, y, float(visible))
    ys, xs = np.nonzero(instance == inst_id)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return WorldObject(inst_id, fig.category, colour, texture, pose, kps, names, bbox, int(len(xs)))


def _caption_parts(category: str, parts: np.ndarray) -> tuple[str, ...]:
    """The CAPTION_PARTS of a close-up's figure that show in its part map (H, W), in CAPTION_PARTS order."""
    present = set(np.unique(parts).tolist())
    return tuple(p for p in CAPTION_PARTS[category] if PART_IDS[(category, p)] in present)


def _caption(objects: list[WorldObject], stuff_names: tuple[str, str],
             parts: tuple[str, ...] = ()) -> tuple[str, list[dict]]:
    """"a red face and a blue circle on grass under sky", with each object's colour/category word index;
    a close-up names its figure's visible parts: "a red face with eye nose mouth on grass under sky"."""
    words: list[str] = []
    index: list[dict] = []
    for k, obj in enumerate(objects):
        if k:
            words.append("and")
        words += ["a", obj.colour, obj.category]
        index.append({"colour": len(words) - 2, "category": len(words) - 1})
    if parts:
        words.append("with")
        index[0]["parts"] = {p: len(words) + i for i, p in enumerate(parts)}
        words += list(parts)
    top, bottom = stuff_names
    words += ["on", bottom, "under" if top == "sky" else "by", top]
    return " ".join(words), index

