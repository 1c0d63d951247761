"""Write world scenes in the published layouts of real datasets, so the real readers load them.

- COCO-Stuff (STEGO/PiCIE layout): images/val2017/<12-digit id>.jpg, annotations/val2017/<id>.png
  holding 0-based COCO-Stuff-182 ids (255 unlabeled), curated/val2017/Coco164kFull_Stuff_Coarse_7.txt.
- CelebA + MAFL: Img/img_align_celeba/<6-digit>.jpg, Anno/list_landmarks_align_celeba.txt (count,
  header, "<file> lx ly rx ry nx ny mlx mly mrx mry" integer pixels), Eval/list_eval_partition.txt,
  MAFL/training.txt and MAFL/testing.txt (file names).
- CUB-200-2011: CUB_200_2011/{images.txt, classes.txt, image_class_labels.txt, train_test_split.txt,
  bounding_boxes.txt, parts/parts.txt, parts/part_locs.txt, images/<class>/<file>.jpg}; one class per
  colour ("001.red_bird", ...), the 15 parts in CUB's order, invisible parts written as 0 0 0.
- SPair-71k: SPair-71k/JPEGImages/<category>/<name>.jpg, PairAnnotation/{trn,val,test}/
  <id>-<src>-<trg>:<category>.json, Layout/large/{trn,val,test}.txt.

Every writer also saves world.json: the full ground truth of what it wrote (objects, keypoints with
visibility, captions). Integer landmark files store the index of the pixel containing the point.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffprobe.data.world.pairs import WorldPair
from diffprobe.data.world.scene import Scene
from diffprobe.data.world.vocab import CLASSES, COCO_FINE, COLOURS
from diffprobe.io import atomic_path, save_json, save_png, save_text

CELEBA_HEADER = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
CUB_PART_NAMES = ("back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
                  "nape", "right eye", "right leg", "right wing", "tail", "throat")
SPAIR_SPLITS = {"train": "trn", "val": "val", "test": "test"}


def save_jpeg(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=95)


def _write_lines(path: Path, lines: list[str]) -> None:
    save_text(path, "".join(line + "\n" for line in lines))


def coco_fine_labels(scene: Scene) -> np.ndarray:
    """(H, W) uint8 COCO-Stuff-182 ids (0-based) of a scene's class map."""
    lut = np.array([COCO_FINE[c] for c in CLASSES], dtype=np.uint8)
    return lut[scene.classes]


def write_coco_stuff(root: str | Path, scenes: list[Scene], folder: str = "val2017") -> Path:
    """COCO-Stuff layout under root; image ids are the scenes' positions (1-based), 12 digits."""
    root = Path(root)
    ids = [f"{i + 1:012d}" for i in range(len(scenes))]
    for sid, scene in zip(ids, scenes):
        save_jpeg(root / "images" / folder / f"{sid}.jpg", scene.image)
        save_png(root / "annotations" / folder / f"{sid}.png", coco_fine_labels(scene))
    _write_lines(root / "curated" / folder / "Coco164kFull_Stuff_Coarse_7.txt", ids)
    save_json(root / "world.json", {sid: s.to_dict() for sid, s in zip(ids, scenes)})
    return root


def _pixel(v: float) -> int:
    return int(np.floor(v))


def write_celeba(root: str | Path, train: list[Scene], test: list[Scene]) -> Path:
    """CelebA/MAFL layout; the first object of every scene must be a face (render with first="face")."""
    root = Path(root)
    rows, partition, names = [], [], {"train": [], "test": []}
    for k, (split, scene) in enumerate([("train", s) for s in train] + [("test", s) for s in test]):
        face = scene.objects[0]
        if face.category != "face":
            raise ValueError(f"scene {scene.seed}: first object is a {face.category}, not a face")
        name = f"{k + 1:06d}.jpg"
        save_jpeg(root / "Img" / "img_align_celeba" / name, scene.image)
        rows.append(name + " " + " ".join(f"{_pixel(v):4d}" for x, y, _ in face.keypoints for v in (x, y)))
        partition.append(f"{name} {0 if split == 'train' else 2}")
        names[split].append(name)
    _write_lines(root / "Anno" / "list_landmarks_align_celeba.txt", [str(len(rows)), CELEBA_HEADER] + rows)
    _write_lines(root / "Eval" / "list_eval_partition.txt", partition)
    _write_lines(root / "MAFL" / "training.txt", names["train"])
    _write_lines(root / "MAFL" / "testing.txt", names["test"])
    save_json(root / "world.json", {f"{k + 1:06d}.jpg": s.to_dict() for k, s in enumerate(train + test)})
    return root


def write_cub(root: str | Path, train: list[Scene], test: list[Scene]) -> Path:
    """CUB-200-2011 layout under root/CUB_200_2011; the first object of every scene must be a bird."""
    base = Path(root) / "CUB_200_2011"
    classes = {c: i + 1 for i, c in enumerate(COLOURS)}
    class_dir = {c: f"{i:03d}.{c}_bird" for c, i in classes.items()}
    tables: dict[str, list[str]] = {k: [] for k in ("images", "labels", "split", "boxes", "parts")}
    world = {}
    for image_id, (is_train, scene) in enumerate([(1, s) for s in train] + [(0, s) for s in test], start=1):
        bird = scene.objects[0]
        if bird.category != "bird":
            raise ValueError(f"scene {scene.seed}: first object is a {bird.category}, not a bird")
        rel = f"{class_dir[bird.colour]}/{bird.colour}_bird_{image_id:06d}.jpg"
        save_jpeg(base / "images" / rel, scene.image)
        x0, y0, x1, y1 = bird.bbox
        tables["images"].append(f"{image_id} {rel}")
        tables["labels"].append(f"{image_id} {classes[bird.colour]}")
        tables["split"].append(f"{image_id} {is_train}")
        tables["boxes"].append(f"{image_id} {float(x0):.1f} {float(y0):.1f} {float(x1 - x0):.1f} {float(y1 - y0):.1f}")
        for part_id, (x, y, v) in enumerate(bird.keypoints, start=1):
            x, y = (x, y) if v else (0.0, 0.0)
            tables["parts"].append(f"{image_id} {part_id} {x:.1f} {y:.1f} {int(v)}")
        world[rel] = scene.to_dict()
    _write_lines(base / "images.txt", tables["images"])
    _write_lines(base / "classes.txt", [f"{i} {class_dir[c]}" for c, i in classes.items()])
    _write_lines(base / "image_class_labels.txt", tables["labels"])
    _write_lines(base / "train_test_split.txt", tables["split"])
    _write_lines(base / "bounding_boxes.txt", tables["boxes"])
    _write_lines(base / "parts" / "parts.txt", [f"{i} {n}" for i, n in enumerate(CUB_PART_NAMES, start=1)])
    _write_lines(base / "parts" / "part_locs.txt", tables["parts"])
    save_json(base / "world.json", world)
    return base


def _spair_side(scene: Scene, name: str, points: np.ndarray, prefix: str) -> dict:
    obj = scene.objects[0]
    h, w = scene.image.shape[:2]
    occluded = bool(np.any(obj.keypoints[:, 2] == 0)) if len(obj.keypoints) else False
    return {f"{prefix}_imname": f"{name}.jpg", f"{prefix}_imsize": [w, h, 3], f"{prefix}_bndbox": list(obj.bbox),
            f"{prefix}_pose": "Left" if obj.pose["flipped"] else "Right", f"{prefix}_trunc": 0,
            f"{prefix}_occl": int(occluded), f"{prefix}_kps": [[round(float(x), 2), round(float(y), 2)]
                                                                 for x, y in points]}


def write_spair(root: str | Path, pairs: dict[str, list[WorldPair]]) -> Path:
    """SPair-71k layout under root/SPair-71k; `pairs` maps a split (train/val/test) to its pairs."""
    base = Path(root) / "SPair-71k"
    pair_id, world = 0, {}
    for split, split_pairs in pairs.items():
        folder = SPAIR_SPLITS[split]
        layout = []
        for pair in split_pairs:
            pair_id += 1
            names = [f"world_{folder}_{pair_id:06d}_{k}" for k in ("a", "b")]
            for name, scene in zip(names, (pair.source, pair.target)):
                save_jpeg(base / "JPEGImages" / pair.category / f"{name}.jpg", scene.image)
            stem = f"{pair_id:06d}-{names[0]}-{names[1]}:{pair.category}"
            src, trg = pair.source.objects[0], pair.target.objects[0]
            ann = {"pair_id": pair_id, "filename": stem, "category": pair.category,
                   **_spair_side(pair.source, names[0], pair.source_points, "src"),
                   **_spair_side(pair.target, names[1], pair.target_points, "trg"),
                   "kps_ids": [int(i) for i in pair.keypoint_ids],
                   "mirror": int(src.pose["flipped"] != trg.pose["flipped"]),
                   "viewpoint_variation": int(src.pose["flipped"] != trg.pose["flipped"]),
                   "scale_variation": int(max(src.area, trg.area) > 2 * min(src.area, trg.area)),
                   "truncation": 0}
            ann["occlusion"] = int(ann["src_occl"] or ann["trg_occl"])
            save_json(base / "PairAnnotation" / folder / f"{stem}.json", ann)
            layout.append(stem)
            world[stem] = {"source": pair.source.to_dict(), "target": pair.target.to_dict()}
        _write_lines(base / "Layout" / "large" / f"{folder}.txt", layout)
    save_json(base / "world.json", world)
    return base
