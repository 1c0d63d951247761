"""Pair readers on fixture trees: SPair-71k layout (incl. per-category subsets), pairs JSON, CUB pairs."""

import json

import numpy as np
import pytest
from hyperfeatures_fixtures import cub_tree, spair_tree, write_image

from diffprobe.data.cub_pairs import cub_pairs
from diffprobe.data.pairs_json import read_pairs_json
from diffprobe.data.spair import read_spair
from diffprobe.errors import DiffprobeError


def test_spair_reads_pairs_points_boxes_and_subsets(tmp_path):
    root = spair_tree(tmp_path / "SPair-71k")
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
    write_image(tmp_path / "imgs" / "a.jpg")
    write_image(tmp_path / "imgs" / "bird" / "b.jpg")  # found through the category folder
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


def test_cub_pairs_use_parts_visible_in_both(tmp_path):
    root = cub_tree(tmp_path / "CUB_200_2011")
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
