"""Pair readers on fixture trees: SPair-71k layout (incl. per-category subsets), pairs JSON, CUB pairs."""

import json

import numpy as np
import pytest
from PIL import Image

from diffprobe.data.cub_pairs import cub_pairs
from diffprobe.data.pairs_json import read_pairs_json
from diffprobe.data.spair import read_spair
from diffprobe.errors import DiffprobeError


def _img(path, w=40, h=30):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (120, 30, 200)).save(path)


def _spair_tree(root, per_cat=4, cats=("cat", "dog", "car")):
    for c in cats:
        for k in range(per_cat + 1):
            _img(root / "JPEGImages" / c / f"{c}_{k}.jpg")
        for split in ("trn", "test"):
            d = root / "PairAnnotation" / split
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_cat):
                ann = {"src_imname": f"{c}_{k}.jpg", "trg_imname": f"{c}_{k + 1}.jpg", "category": c,
                       "src_kps": [[1, 2], [3, 4]], "trg_kps": [[5, 6], [7, 8]],
                       "src_bndbox": [0, 0, 20, 10], "trg_bndbox": [1, 1, 31, 21], "pair_id": k}
                (d / f"{k:06d}-{c}_{k}-{c}_{k + 1}:{c}.json").write_text(json.dumps(ann))
    return root


def test_spair_reads_pairs_points_boxes_and_subsets(tmp_path):
    root = _spair_tree(tmp_path / "SPair-71k")
    pairs = read_spair(tmp_path, split="test")  # finds the SPair-71k folder inside
    assert len(pairs) == 12
    p = next(q for q in pairs if q.name == "000001-dog_1-dog_2:dog")
    assert p.source == root / "JPEGImages" / "dog" / "dog_1.jpg"
    np.testing.assert_array_equal(p.target_points, [[5, 6], [7, 8]])
    np.testing.assert_array_equal(p.target_bbox, [1, 1, 31, 21])
    assert p.category == "dog"
    sub = read_spair(root, split="test", per_category=2, seed=3)
    assert len(sub) == 6 and {q.category for q in sub} == {"cat", "dog", "car"}
    assert [q.name for q in sub] == [q.name for q in read_spair(root, split="test", per_category=2, seed=3)]
    assert len(read_spair(root, split="train", categories=["car"])) == 4
    with pytest.raises(DiffprobeError, match="categories"):
        read_spair(root, categories=["zebra"])
    with pytest.raises(DiffprobeError, match="split"):
        read_spair(root, split="dev")
    with pytest.raises(DiffprobeError, match="PairAnnotation"):
        read_spair(tmp_path / "nowhere")


def test_pairs_json_reads_reference_keys_and_category_folders(tmp_path):
    _img(tmp_path / "imgs" / "a.jpg")
    _img(tmp_path / "imgs" / "bird" / "b.jpg")  # found through the category folder
    data = [{"source_path": "a.jpg", "target_path": "b.jpg", "category": "bird",
             "source_points": [[1, 2], [3, 4], [5, 6]], "target_points": [[6, 5], [4, 3], [2, 1]],
             "target_bounding_box": [0, 0, 10, 20]}]
    (tmp_path / "pairs.json").write_text(json.dumps({"pairs": data}))
    pairs = read_pairs_json(tmp_path / "pairs.json", image_root=tmp_path / "imgs")
    assert len(pairs) == 1 and pairs[0].target == tmp_path / "imgs" / "bird" / "b.jpg"
    assert pairs[0].source_points.shape == (3, 2) and pairs[0].source_bbox is None
    np.testing.assert_array_equal(pairs[0].target_bbox, [0, 0, 10, 20])
    bad = dict(data[0], target_points=[[1, 1]])
    (tmp_path / "bad.json").write_text(json.dumps([bad]))
    with pytest.raises(DiffprobeError, match="both be"):
        read_pairs_json(tmp_path / "bad.json", image_root=tmp_path / "imgs")
    (tmp_path / "missing.json").write_text(json.dumps([dict(data[0], source_path="zzz.jpg")]))
    with pytest.raises(DiffprobeError, match="zzz.jpg"):
        read_pairs_json(tmp_path / "missing.json", image_root=tmp_path / "imgs")


def _cub_tree(root):
    """3 images of class 1, 1 of class 2; parts 1-3 visible everywhere, part 4 only in image 1."""
    (root / "parts").mkdir(parents=True)
    imgs = {1: "001.A/x1.jpg", 2: "001.A/x2.jpg", 3: "001.A/x3.jpg", 4: "002.B/y1.jpg"}
    for i, rel in imgs.items():
        _img(root / "images" / rel)
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


def test_cub_pairs_use_parts_visible_in_both(tmp_path):
    root = _cub_tree(tmp_path / "CUB_200_2011")
    pairs = cub_pairs(tmp_path, split="test", pairs_per_class=10, min_common=3)
    assert sorted(p.name for p in pairs) == ["1-2", "1-3", "2-3"]  # class 2 has one image: no pair
    p = next(q for q in pairs if q.name == "1-2")
    np.testing.assert_array_equal(p.source_points, [[11, 1], [12, 2], [13, 3]])  # part 4 not visible in image 2
    np.testing.assert_array_equal(p.target_points, [[21, 1], [22, 2], [23, 3]])
    np.testing.assert_array_equal(p.target_bbox, [1, 2, 31, 22])
    assert p.category == "001.A" and p.source == root / "images" / "001.A" / "x1.jpg"
    assert len(cub_pairs(tmp_path, split="test", pairs_per_class=1)) == 1
    with pytest.raises(DiffprobeError, match="shares 4"):
        cub_pairs(tmp_path, split="test", min_common=4)
