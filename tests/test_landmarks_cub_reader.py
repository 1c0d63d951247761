"""CUB-200-2011 reader on a fixture tree in the standard layout."""

import numpy as np
import pytest

from diffprobe.data.cub import NUM_PARTS, CubDataset, square_box
from diffprobe.errors import DiffprobeError


def make_cub(root):
    base = root / "CUB_200_2011"
    (base / "parts").mkdir(parents=True)
    files = {1: "001.Albatross/a_1.jpg", 2: "001.Albatross/a_2.jpg", 3: "002.Auklet/b_1.jpg"}
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in files.items()))
    (base / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")
    (base / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n")
    (base / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    (base / "bounding_boxes.txt").write_text("1 10.0 20.0 30.0 40.0\n2 0 0 5 5\n3 1 2 3 4\n")
    lines = []
    for img in (1, 2, 3):
        for part in range(1, NUM_PARTS + 1):
            visible = int(part % 2 == 1 or img == 3)
            x, y = (img * 100 + part, img * 10 + part) if visible else (0, 0)
            lines.append(f"{img} {part} {x}.0 {y}.0 {visible}\n")
    (base / "parts" / "part_locs.txt").write_text("".join(lines))
    return base


def test_reads_splits_boxes_and_parts(tmp_path):
    base = make_cub(tmp_path)
    train = CubDataset(tmp_path, split="train")       # parent of CUB_200_2011 is accepted
    assert [r.image_id for r in train] == [1, 3]
    rec = train[0]
    assert rec.path == base / "images" / "001.Albatross" / "a_1.jpg"
    assert rec.class_id == 1 and rec.is_train
    np.testing.assert_allclose(rec.bbox, [10, 20, 30, 40])
    assert rec.keypoints.shape == (NUM_PARTS, 2) and rec.visible.shape == (NUM_PARTS,)
    np.testing.assert_allclose(rec.keypoints[2], [103, 13])     # part 3 (odd: visible)
    assert rec.visible[2] and not rec.visible[1]
    assert train[1].visible.all()
    test = CubDataset(base, split="test")
    assert [r.image_id for r in test] == [2]
    assert len(CubDataset(base)) == 3
    assert CubDataset(base).by_class() == {1: [0, 1], 2: [2]}
    assert [r.image_id for r in CubDataset(base, classes=[2])] == [3]
    assert CubDataset(base).part_names[1] == "beak"


def test_square_box_centres_on_bird():
    assert square_box(np.array([10, 20, 30, 40])) == (5.0, 20.0, 45.0, 60.0)
    assert square_box(np.array([0, 0, 10, 10]), margin=0.5) == (-5.0, -5.0, 15.0, 15.0)


def test_bad_layouts_raise_clear_errors(tmp_path):
    with pytest.raises(DiffprobeError, match="images.txt"):
        CubDataset(tmp_path)
    base = make_cub(tmp_path)
    with pytest.raises(DiffprobeError, match="split"):
        CubDataset(base, split="val")
    (base / "bounding_boxes.txt").write_text("1 10 20 x 40\n")
    with pytest.raises(DiffprobeError, match="bounding_boxes.txt:1"):
        CubDataset(base)
    (base / "bounding_boxes.txt").unlink()
    with pytest.raises(DiffprobeError, match="missing annotation file"):
        CubDataset(base)
