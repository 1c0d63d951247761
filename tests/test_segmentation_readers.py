"""COCO-Stuff-27 and Cityscapes readers on small fixture trees in the real layouts."""

import numpy as np
import pytest
from PIL import Image

from diffprobe.data.cityscapes import Cityscapes27
from diffprobe.data.coco_stuff import COARSE_TO_FINE, FINE_TO_COARSE, CocoStuff27
from diffprobe.data.labelled_images import center_crop_label
from diffprobe.errors import DiffprobeError


def write_pair(image_path, label_path, label, suffix_mode="RGB"):
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    h, w = label.shape
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(image_path)
    Image.fromarray(label.astype(np.uint8), mode="L").save(label_path)


FINE = np.array([[0, 0, 156, 255], [169, 181, 1, 100]])  # person, person, sky, unlabelled / food-stuff, ...


def test_fine_to_coarse_covers_all_182_fine_classes_once():
    assert sorted(FINE_TO_COARSE) == list(range(182))
    assert len(COARSE_TO_FINE) == 27
    names = list(COARSE_TO_FINE)
    assert names[FINE_TO_COARSE[0]] == "person" and names[FINE_TO_COARSE[156]] == "sky"


def test_coco_reference_layout(tmp_path):
    ids = ["000000000139", "000000000724"]
    for i in ids:
        write_pair(tmp_path / "val2017" / f"{i}.jpg", tmp_path / "annotation_val2017" / f"{i}.png", FINE)
    (tmp_path / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(ids) + "\n")
    with pytest.raises(DiffprobeError, match="2175"):
        CocoStuff27(tmp_path)  # a short list is refused unless asked for on purpose
    ds = CocoStuff27(tmp_path, list_file=tmp_path / "Coco164kFull_Stuff_Coarse_7.txt")
    assert len(ds) == 2 and ds[1].name == ids[1] and ds.num_classes == 27
    image, label = ds.load(0)
    assert image.size == (4, 2)
    np.testing.assert_array_equal(label, [[9, 9, 23, 255], [14, 24, 11, 13]])


def test_coco_stego_layout_and_full_list(tmp_path):
    ids = [f"{k:012d}" for k in range(2175)]
    (tmp_path / "curated" / "val2017").mkdir(parents=True)
    (tmp_path / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(ids))
    write_pair(tmp_path / "images" / "val2017" / f"{ids[5]}.jpg", tmp_path / "annotations" / "val2017" / f"{ids[5]}.png",
               FINE)
    ds = CocoStuff27(tmp_path)
    assert len(ds) == 2175
    assert ds[5].image_path == tmp_path / "images" / "val2017" / f"{ids[5]}.jpg"
    assert ds.load(5)[1][0, 2] == 23
    with pytest.raises(DiffprobeError, match="image not found"):
        ds.load(0)


def test_coco_missing_list_is_a_clear_error(tmp_path):
    with pytest.raises(DiffprobeError, match="Coco164kFull_Stuff_Coarse_7.txt"):
        CocoStuff27(tmp_path)


def test_cityscapes_val_layout(tmp_path):
    label = np.array([[7, 33, 0], [6, 34, 26]])
    for city, frame in (("lindau", "000000_000019"), ("frankfurt", "000001_000020")):
        stem = f"{city}_{frame}"
        write_pair(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png",
                   tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", label)
    ds = Cityscapes27(tmp_path)
    assert [r.name for r in ds.items] == ["frankfurt_000001_000020", "lindau_000000_000019"]
    assert ds.num_classes == 27
    np.testing.assert_array_equal(ds.load(0)[1], [[0, 26, 255], [255, 255, 19]])
    with pytest.raises(DiffprobeError, match="leftImg8bit"):
        Cityscapes27(tmp_path, split="test")


def test_center_crop_label_nearest():
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)  # crop columns 0..2 (left = (4 - 3) // 2 = 0)
    np.testing.assert_array_equal(center_crop_label(label, 3), label[:, 0:3])
    big = center_crop_label(label, 6)
    assert big.shape == (6, 6) and set(np.unique(big)) <= set(label[:, 0:3].ravel())
