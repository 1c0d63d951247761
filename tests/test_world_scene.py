"""The world generator: determinism, splits, and ground truth that agrees with what was drawn."""

import numpy as np
import pytest

from diffprobe.data.world import CLASSES, KEYPOINTS, render_scene, scene_seed
from diffprobe.data.world.pairs import world_pairs
from diffprobe.data.world.vocab import CAPTION_PARTS, PART_IDS, STUFF, THINGS, vocabulary
from diffprobe.errors import DiffprobeError

# Which drawn part every keypoint must sit on (written independently of the generator's tables).
EXPECTED_PART = {
    "face": {"left_eye": "eye", "right_eye": "eye", "nose": "nose", "mouth_left": "mouth", "mouth_right": "mouth"},
    "bird": {"back": "body", "beak": "beak", "belly": "body", "breast": "body", "crown": "head",
             "forehead": "head", "left_eye": "eye", "left_leg": "leg", "left_wing": "wing", "nape": "head",
             "right_eye": "eye", "right_leg": "leg", "right_wing": "wing", "tail": "tail", "throat": "head"},
    "house": {"roof_apex": "roof", "roof_left": "roof", "roof_right": "roof", "window_left": "window",
              "window_right": "window", "door": "door", "base_left": "wall", "base_right": "wall"},
}
SEEDS = [scene_seed("test", i) for i in range(12)]


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b, c = render_scene(SEEDS[0]), render_scene(SEEDS[0]), render_scene(SEEDS[1])
    for field in ("image", "instance", "classes", "parts"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.caption == b.caption and a.to_dict() == b.to_dict()
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8


def test_splits_never_share_seeds_and_bad_input_is_a_clear_error():
    seeds = {s: {scene_seed(s, i) for i in range(500)} for s in ("train", "val", "test")}
    assert all(len(v) == 500 for v in seeds.values())
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"] or seeds["val"] & seeds["test"])
    with pytest.raises(DiffprobeError, match="split"):
        scene_seed("holdout", 0)
    with pytest.raises(DiffprobeError, match="64"):
        render_scene(0, size=32)
    with pytest.raises(DiffprobeError, match="category"):
        render_scene(0, first="unicorn")


@pytest.mark.parametrize("seed", SEEDS)
def test_label_maps_agree_with_objects(seed):
    s = render_scene(seed)
    stuff_ids = [CLASSES.index(n) for n in STUFF]
    assert np.isin(s.classes[s.instance == 0], stuff_ids).all()
    assert (s.parts[s.instance == 0] == 0).all() and (s.parts[s.instance > 0] > 0).all()
    assert set(np.unique(s.instance)) == set(range(len(s.objects) + 1))
    for obj in s.objects:
        mask = s.instance == obj.instance
        assert (s.classes[mask] == CLASSES.index(obj.category)).all()
        assert obj.area == mask.sum() >= 12
        ys, xs = np.nonzero(mask)
        assert obj.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        for x, y, v in obj.keypoints:
            if v:
                assert mask[int(y), int(x)], "a visible keypoint lies outside its object's mask"


def test_caption_names_every_object_by_colour_and_category_in_vocabulary():
    for seed in SEEDS:
        s = render_scene(seed)
        words = s.caption.split()
        assert set(words) <= set(vocabulary())
        for obj, idx in zip(s.objects, s.words):
            assert words[idx["colour"]] == obj.colour and words[idx["category"]] == obj.category
        assert words[-1] == s.stuff[0] and words[-3] == s.stuff[1]
        assert len({o.category for o in s.objects}) == len(s.objects)  # one word, one object


@pytest.mark.parametrize("category", ["face", "bird", "house"])
def test_visible_keypoints_sit_on_their_drawn_part(category):
    """At 192 px every part is several pixels wide, so the pixel under a keypoint shows its part."""
    part_of = {v: k[1] for k, v in PART_IDS.items()}
    checked = 0
    for i in range(6):
        s = render_scene(scene_seed("val", i), size=192, first=category)
        obj = s.objects[0]
        assert obj.keypoint_names == KEYPOINTS[category]
        for name, (x, y, v) in zip(obj.keypoint_names, obj.keypoints):
            if v:
                assert part_of[int(s.parts[int(y), int(x)])] == EXPECTED_PART[category][name], name
                checked += 1
    assert checked >= 6 * len(KEYPOINTS[category]) // 2


def test_unoccluded_object_shows_all_keypoints_but_birds_hide_their_far_side():
    for i in range(10):
        s = render_scene(scene_seed("val", 100 + i), first="bird", max_objects=1)
        bird = s.objects[0]
        vis = dict(zip(bird.keypoint_names, bird.keypoints[:, 2]))
        far = "right" if bird.pose["flipped"] else "left"  # facing image-right shows the right side
        assert vis[f"{far}_eye"] == 0 and vis[f"{far}_wing"] == 0
        near = "right" if far == "left" else "left"
        assert vis[f"{near}_wing"] == 1
    face = render_scene(scene_seed("val", 7), first="face", max_objects=1).objects[0]
    inside = [(0 <= x < 64 and 0 <= y < 64) for x, y, _ in face.keypoints]
    np.testing.assert_array_equal(face.keypoints[:, 2], inside)
    assert face.keypoints[0, 0] < face.keypoints[1, 0]  # left_eye is on the image left (|angle| <= 20 deg)


def test_pairs_list_keypoints_visible_in_both_images():
    pairs = world_pairs("test", "bird", 3)
    assert len(pairs) == 3
    for p in pairs:
        a, b = p.source.objects[0], p.target.objects[0]
        assert a.category == b.category == "bird" and len(p.keypoint_ids) >= 3
        np.testing.assert_allclose(p.source_points, a.keypoints[p.keypoint_ids, :2])
        np.testing.assert_allclose(p.target_points, b.keypoints[p.keypoint_ids, :2])
        assert (a.keypoints[p.keypoint_ids, 2] == 1).all() and (b.keypoints[p.keypoint_ids, 2] == 1).all()
    with pytest.raises(DiffprobeError):
        world_pairs("test", "circle", 1)


def test_colour_alone_does_not_separate_objects_from_stuff():
    """Object colours overlap the stuff palette: even the best colour -> {object, stuff} table, fitted on
    the very pixels it is scored on (8 bins per channel), stays well short of a perfect object mask."""
    scenes = [render_scene(scene_seed("train", i)) for i in range(40)]
    q = np.concatenate([(s.image // 32).reshape(-1, 3) for s in scenes]).astype(int)
    code = (q[:, 0] * 8 + q[:, 1]) * 8 + q[:, 2]
    is_obj = np.concatenate([(s.instance > 0).ravel() for s in scenes])
    counts = np.zeros((512, 2))
    np.add.at(counts, (code, is_obj.astype(int)), 1)
    pred = (counts[:, 1] > counts[:, 0])[code]
    iou = (pred & is_obj).sum() / (pred | is_obj).sum()
    assert iou < 0.8
    assert set(THINGS) >= {o.category for s in scenes for o in s.objects}


@pytest.mark.parametrize("category", ["face", "bird", "house"])
def test_closeups_show_one_large_centred_figure_with_keypoints_in_its_mask(category):
    part_of = {v: k[1] for k, v in PART_IDS.items()}
    for i in range(8):
        s = render_scene(scene_seed("test", i), size=128, first=category, closeup=True)
        (obj,) = s.objects
        x0, y0, x1, y1 = obj.bbox
        assert 0.5 <= max(x1 - x0, y1 - y0) / 128 <= 1.0  # half to most of the frame
        cx, cy = (x0 + x1) / 2 / 128, (y0 + y1) / 2 / 128
        assert 0.3 < cx < 0.7 and 0.3 < cy < 0.7  # roughly centred
        visible = obj.keypoints[obj.keypoints[:, 2] > 0]
        assert len(visible) >= 3
        for (x, y, _), name in zip(obj.keypoints, obj.keypoint_names):
            if _:
                assert s.instance[int(y), int(x)] == obj.instance  # inside the object's mask
                assert part_of[int(s.parts[int(y), int(x)])] == EXPECTED_PART[category][name], name
        assert s.caption.startswith(f"a {obj.colour} {category} with ")
        words, named = s.caption.split(), s.words[0]["parts"]
        assert named and all(words[i] == part for part, i in named.items())
        shown = {part_of[int(v)] for v in np.unique(s.parts) if v}
        assert set(named) <= shown and set(named) == set(CAPTION_PARTS[category]) & shown  # only, and all, shown
    with pytest.raises(DiffprobeError, match="close-ups show a figure"):
        render_scene(0, closeup=True, first="circle")
