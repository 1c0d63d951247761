"""Shared by the hyperfeatures tests: planted correspondence pairs and one tiny model."""

import functools
import json

import numpy as np
from PIL import Image

from diffprobe.data.pairs_json import CorrespondencePair

SIZE = 64


@functools.lru_cache(maxsize=1)
def tiny_sd15():
    """One frozen tiny SD 1.5-structured backbone and its registry for all hyperfeatures test modules
    (captures remove their hooks, so sharing it is safe)."""
    from diffprobe.loading import tiny_backbone

    bb = tiny_backbone("sd15", seed=0)
    return bb, bb.probe


def planted_pairs(root, n=3, seed=0):
    """Gaussian-blob images; the target is the source rolled by (8(k+1), 8) px with colours inverted, so
    the blob centres move by a known shift and raw features of the two images differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    pairs = []
    for k in range(n):
        img, pts = np.zeros((SIZE, SIZE, 3)), []
        for _ in range(6):
            cx, cy = rng.uniform(8, 56, 2)
            img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 32.0)[..., None] * rng.uniform(0, 1, 3)
            pts.append([cx, cy])
        img = np.clip(img, 0, 1)
        dx, dy = 8 * (k + 1), 8
        tgt = 1 - np.roll(img, (dy, dx), (0, 1))
        for name, arr in ((f"s{k}.png", img), (f"t{k}.png", tgt)):
            Image.fromarray((arr * 255).astype(np.uint8)).save(root / name)
        src_pts = np.array(pts)
        pairs.append(CorrespondencePair(root / f"s{k}.png", root / f"t{k}.png", src_pts, (src_pts + [dx, dy]) % SIZE,
                                        target_bbox=np.array([0.0, 0.0, 32.0, 32.0]), name=str(k)))
    return pairs


def write_image(path, w=40, h=30):
    """A plain RGB image file (readers only check that images exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (120, 30, 200)).save(path)


def spair_tree(root, per_cat=4, cats=("cat", "dog", "car")):
    """An SPair-71k layout: per category per_cat + 1 images and per_cat pairs in trn and test."""
    for c in cats:
        for k in range(per_cat + 1):
            write_image(root / "JPEGImages" / c / f"{c}_{k}.jpg")
        for split in ("trn", "test"):
            d = root / "PairAnnotation" / split
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_cat):
                ann = {"src_imname": f"{c}_{k}.jpg", "trg_imname": f"{c}_{k + 1}.jpg", "category": c,
                       "src_kps": [[1, 2], [3, 4]], "trg_kps": [[5, 6], [7, 8]],
                       "src_bndbox": [0, 0, 20, 10], "trg_bndbox": [1, 1, 31, 21], "pair_id": k}
                (d / f"{k:06d}-{c}_{k}-{c}_{k + 1}:{c}.json").write_text(json.dumps(ann))
    return root


def cub_tree(root):
    """3 images of class 1, 1 of class 2; parts 1-3 visible everywhere, part 4 only in image 1."""
    (root / "parts").mkdir(parents=True)
    imgs = {1: "001.A/x1.jpg", 2: "001.A/x2.jpg", 3: "001.A/x3.jpg", 4: "002.B/y1.jpg"}
    for i, rel in imgs.items():
        write_image(root / "images" / rel)
    (root / "images.txt").write_text("".join(f"{i} {r}\n" for i, r in imgs.items()))
    (root / "classes.txt").write_text("1 001.A\n2 002.B\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 1\n4 2\n")
    (root / "train_test_split.txt").write_text("1 0\n2 0\n3 0\n4 0\n")
    (root / "bounding_boxes.txt").write_text("".join(f"{i} 1 2 30 20\n" for i in imgs))
    rows = []
    for i in imgs:
        for part in range(1, 16):
            vis = int(part <= 3 or (part == 4 and i == 1))
            rows.append(f"{i} {part} {10 * i + part if vis else 0} {part if vis else 0} {vis}\n")
    (root / "parts" / "part_locs.txt").write_text("".join(rows))
    return root
