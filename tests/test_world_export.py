"""World splits written in real dataset layouts load back through the real readers with the same truth."""

import numpy as np
import pytest

from diffprobe.data.world import CLASSES, render_scene, scene_seed
from diffprobe.data.world.export import (CELEBA_HEADER, coco_fine_labels, write_celeba, write_coco_stuff,
                                         write_cub, write_spair)
from diffprobe.data.world.pairs import world_pairs


def _scenes(split, n, first=None, max_objects=3):
    return [render_scene(scene_seed(split, i), first=first, max_objects=max_objects) for i in range(n)]


def test_coco_stuff_layout_reads_back_as_coarse_classes(tmp_path):
    from diffprobe.data.coco_stuff import FINE_TO_COARSE, CocoStuff27

    scenes = _scenes("test", 3)
    write_coco_stuff(tmp_path, scenes)
    ds = CocoStuff27(tmp_path, list_file=tmp_path / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt")
    assert len(ds) == 3
    coarse = {name: CocoStuff27.class_names[FINE_TO_COARSE[fine]] for name, fine in
              {"sky": 156, "grass": 123, "face": 0, "bird": 15, "house": 127}.items()}
    assert coarse == {"sky": "sky", "grass": "plant", "face": "person", "bird": "animal", "house": "building"}
    for i, scene in enumerate(scenes):
        image, label = ds.load(i)
        assert image.size == (64, 64)
        expect = np.vectorize(FINE_TO_COARSE.get)(coco_fine_labels(scene))
        np.testing.assert_array_equal(label, expect)
        assert np.abs(np.asarray(image, float) - scene.image).mean() < 8  # JPEG at quality 95
    assert (np.unique(coco_fine_labels(scenes[0])) < 182).all()


def test_cub_layout_reads_back_parts_boxes_and_splits(tmp_path):
    from diffprobe.data.cub import CubDataset

    train, test = _scenes("train", 2, "bird"), _scenes("test", 3, "bird")
    write_cub(tmp_path, train, test)
    ds = CubDataset(tmp_path, split="test")
    assert len(ds) == 3 and len(CubDataset(tmp_path, split="train")) == 2
    assert ds.part_names[1] == "beak" and len(ds.part_names) == 15
    for rec, scene in zip(ds, test):
        bird = scene.objects[0]
        np.testing.assert_array_equal(rec.visible, bird.keypoints[:, 2] > 0)
        np.testing.assert_allclose(rec.keypoints[rec.visible], bird.keypoints[rec.visible, :2], atol=0.051)
        x0, y0, x1, y1 = bird.bbox
        np.testing.assert_allclose(rec.bbox, [x0, y0, x1 - x0, y1 - y0])
        assert ds.class_names[rec.class_id].endswith(f"{bird.colour}_bird")
        assert ds.load_image(0).size == (64, 64)


def test_spair_layout_reads_back_corresponding_points(tmp_path):
    from diffprobe.data.spair import read_spair

    pairs = {"test": world_pairs("test", "face", 2) + world_pairs("test", "house", 1),
             "train": world_pairs("train", "bird", 1)}
    write_spair(tmp_path, pairs)
    read = read_spair(tmp_path, split="test")
    assert sorted(p.category for p in read) == ["face", "face", "house"]
    by_cat = {}
    for p in read:
        by_cat.setdefault(p.category, []).append(p)
    for cat in ("face", "house"):
        for got, want in zip(by_cat[cat], [p for p in pairs["test"] if p.category == cat]):
            np.testing.assert_allclose(got.source_points, want.source_points, atol=0.006)
            np.testing.assert_allclose(got.target_points, want.target_points, atol=0.006)
            assert got.source.is_file() and got.target.is_file()
    assert len(read_spair(tmp_path, split="train")) == 1
    assert (tmp_path / "SPair-71k/Layout/large/test.txt").read_text().count("\n") == 3


def test_celeba_mafl_layout_reads_back_the_five_landmarks(tmp_path):
    from diffprobe.data.celeba import CelebaDataset

    train, test = _scenes("train", 2, "face", 1), _scenes("test", 2, "face", 1)
    write_celeba(tmp_path, train, test)
    lines = (tmp_path / "Anno/list_landmarks_align_celeba.txt").read_text().splitlines()
    assert lines[0] == "4" and lines[1] == CELEBA_HEADER
    for split, want in (("mafl_test", test), ("mafl_train", train), ("test", test), ("all", train + test)):
        ds = CelebaDataset(tmp_path, split=split)
        assert len(ds) == len(want)
        for rec, scene in zip(ds, want):
            np.testing.assert_array_equal(rec.landmarks, np.floor(scene.objects[0].keypoints[:, :2]))
            assert rec.path.is_file()


def test_class_names_cover_stuff_and_things():
    assert CLASSES[:2] == ("sky", "wall") and "bird" in CLASSES
    with pytest.raises(ValueError):
        write_cub("/nonexistent", [render_scene(scene_seed("test", 0), first="face")], [])
