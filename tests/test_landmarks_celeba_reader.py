"""CelebA / MAFL reader on fixture trees in the standard layouts."""

import numpy as np
import pytest
from PIL import Image

from diffprobe.data.celeba import CelebaDataset
from diffprobe.errors import DiffprobeError

NAMES = ["000001.jpg", "000002.jpg", "000003.jpg", "000004.jpg"]


def landmark_file(path, offset):
    lines = [f"{len(NAMES)}\n", "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
             "leftmouth_x leftmouth_y rightmouth_x rightmouth_y\n"]
    for i, n in enumerate(NAMES):
        lines.append(n + "".join(f" {offset + i * 10 + j}" for j in range(10)) + "\n")
    path.write_text("".join(lines))


def make_celeba(root, anno_dirs=False):
    anno = root / "Anno" if anno_dirs else root
    ev = root / "Eval" if anno_dirs else root
    img = root / "Img" if anno_dirs else root
    for d in (anno, ev, img / "img_align_celeba", img / "img_celeba", root / "MAFL"):
        d.mkdir(parents=True, exist_ok=True)
    landmark_file(anno / "list_landmarks_align_celeba.txt", 0)
    landmark_file(anno / "list_landmarks_celeba.txt", 100)
    (ev / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n")
    # wild images are 100 x 100; face boxes cover 40 %, 20 %, 30 %, 90 %
    boxes = [(0, 0, 40, 100), (0, 0, 20, 100), (10, 10, 30, 100), (0, 0, 90, 100)]
    (anno / "list_bbox_celeba.txt").write_text(
        "4\nimage_id x_1 y_1 width height\n" + "".join(f"{n} {' '.join(map(str, b))}\n" for n, b in zip(NAMES, boxes)))
    for n in NAMES:
        Image.new("RGB", (100, 100)).save(img / "img_celeba" / n)
    (root / "MAFL" / "training.txt").write_text("000001.jpg\n000002.jpg\n000003.jpg\n")
    (root / "MAFL" / "testing.txt").write_text("000004.jpg\n")


@pytest.mark.parametrize("anno_dirs", [False, True])
def test_aligned_splits_and_landmarks(tmp_path, anno_dirs):
    make_celeba(tmp_path, anno_dirs)
    ds = CelebaDataset(tmp_path)
    assert [r.name for r in ds] == NAMES
    np.testing.assert_allclose(ds[1].landmarks, np.arange(10, 20).reshape(5, 2))
    assert ds[0].path.parent.name == "img_align_celeba" and ds[0].face_box is None
    assert [r.name for r in CelebaDataset(tmp_path, "train")] == NAMES[:2]
    assert [r.name for r in CelebaDataset(tmp_path, "test")] == NAMES[3:]
    assert [r.name for r in CelebaDataset(tmp_path, "mafl_train")] == NAMES[:3]
    assert [r.name for r in CelebaDataset(tmp_path, "mafl_test")] == NAMES[3:]
    assert [r.name for r in CelebaDataset(tmp_path, "unsupervised")] == NAMES[:3]


def test_wild_keeps_faces_covering_30_percent(tmp_path):
    make_celeba(tmp_path)
    ds = CelebaDataset(tmp_path, variant="wild")
    assert [r.name for r in ds] == ["000001.jpg", "000003.jpg", "000004.jpg"]
    np.testing.assert_allclose(ds[0].landmarks[0], [100, 101])
    np.testing.assert_allclose(ds[1].face_box, [10, 10, 30, 100])


def test_bad_input(tmp_path):
    with pytest.raises(DiffprobeError, match="img_align_celeba"):
        CelebaDataset(tmp_path)
    make_celeba(tmp_path)
    with pytest.raises(DiffprobeError, match="split"):
        CelebaDataset(tmp_path, split="dev")
    (tmp_path / "list_landmarks_align_celeba.txt").write_text("1\nheader\n000001.jpg 1 2 3\n")
    with pytest.raises(DiffprobeError, match="list_landmarks_align_celeba.txt:3"):
        CelebaDataset(tmp_path)


def test_aligned_reads_the_png_release_when_present(tmp_path):
    make_celeba(tmp_path, anno_dirs=True)
    (tmp_path / "Img" / "img_align_celeba_png").mkdir()
    ds = CelebaDataset(tmp_path, "mafl_test")
    assert ds[0].name == "000004.jpg" and ds[0].path == tmp_path / "Img" / "img_align_celeba_png" / "000004.png"
