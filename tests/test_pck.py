"""PCK on hand-made cases: distances, each named normaliser, per point vs per image, pooling."""

import numpy as np
import pytest
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.eval.pck import (
    PCKCounts,
    pck,
    threshold_bbox_max_side,
    threshold_image_max_side,
    threshold_pixels,
    threshold_torso_diagonal,
)


def test_image_max_side_threshold_boundary_counts_as_correct():
    gt = np.array([[10.0, 10.0], [50.0, 50.0], [0.0, 0.0]])
    # offsets of 3-4-5 (=5 px), 6 px, and exactly 10 px
    pred = gt + np.array([[3.0, 4.0], [6.0, 0.0], [0.0, 10.0]])
    thr = threshold_image_max_side(h=60, w=100, alpha=0.1)  # 10 px
    res = pck(pred, gt, thr)
    assert thr.name == "0.1_img"
    np.testing.assert_allclose(res.distances[0], [5.0, 6.0, 10.0])
    assert res.correct.tolist() == [[True, True, True]]
    res = pck(pred, gt, threshold_image_max_side(60, 50, alpha=0.1))  # 6 px
    assert res.correct.tolist() == [[True, True, False]]
    assert res.per_point == pytest.approx(2 / 3)


def test_bbox_threshold_uses_the_longer_box_side_per_image():
    boxes = np.array([[0, 0, 20, 50], [10, 10, 30, 20]])  # sides 50 and 20
    thr = threshold_bbox_max_side(boxes, alpha=0.1)  # 5 px and 2 px
    np.testing.assert_allclose(thr.value, [5.0, 2.0])
    gt = np.zeros((2, 2, 2))
    pred = np.array([[[3.0, 0.0], [6.0, 0.0]], [[3.0, 0.0], [1.0, 1.0]]])
    res = pck(pred, gt, thr)
    assert res.correct.tolist() == [[True, False], [False, True]]
    assert res.name == "0.1_bbox"


def test_pixels_and_torso_thresholds():
    assert threshold_pixels(6).name == "6px"
    res = pck(torch.tensor([[6.0, 0.0], [6.1, 0.0]]), torch.zeros(2, 2), threshold_pixels(6))
    assert res.correct.tolist() == [[True, False]]
    thr = threshold_torso_diagonal([0.0, 0.0], [30.0, 40.0], alpha=0.2)  # 0.2 * 50 = 10
    np.testing.assert_allclose(thr.value, 10.0)
    assert thr.name == "0.2_torso"


def test_per_point_pooling_differs_from_mean_per_image_and_ignores_invisible():
    # image 0: 1 of 1 valid correct; image 1: 1 of 3 valid correct, a 4th point invisible but "correct"
    gt = np.zeros((2, 4, 2))
    pred = np.array([[[0, 0], [99, 0], [99, 0], [99, 0]], [[0, 0], [99, 0], [99, 0], [0, 0]]], float)
    vis = np.array([[1, 0, 0, 0], [1, 1, 1, 0]], bool)
    res = pck(pred, gt, threshold_pixels(1), visible=vis)
    assert res.num_points == 4
    assert res.per_point == pytest.approx(2 / 4)
    np.testing.assert_allclose(res.per_image, [1.0, 1 / 3])
    assert res.mean_per_image == pytest.approx((1 + 1 / 3) / 2)
    s = res.summary()
    assert s["pck@1px_per_point"] == pytest.approx(0.5) and s["threshold"] == "1px"


def test_accumulator_pools_images_with_different_point_counts():
    acc = PCKCounts(2)
    acc.update(0, pck(np.zeros((1, 2)), np.zeros((1, 2)), threshold_pixels(1)))  # 1/1
    acc.update(1, pck(np.full((3, 2), 5.0), np.zeros((3, 2)), threshold_pixels(1)))  # 0/3
    res = acc.result()
    assert res["num_points"] == 4 and res["num_images"] == 2
    assert res["pck@1px_per_point"] == pytest.approx(1 / 4)
    assert res["pck@1px_per_image"] == pytest.approx(0.5)
    with pytest.raises(DiffprobeError, match="cannot pool"):
        acc.update(0, pck(np.zeros((1, 2)), np.zeros((1, 2)), threshold_image_max_side(10, 10)))
    # shards: the states of two halves add up to the whole
    first, second = PCKCounts(2), PCKCounts(2)
    first.update(0, pck(np.zeros((1, 2)), np.zeros((1, 2)), threshold_pixels(1)))
    second.update(1, pck(np.full((3, 2), 5.0), np.zeros((3, 2)), threshold_pixels(1)))
    both = PCKCounts(2)
    both.load_state({k: first.state()[k] + second.state()[k] for k in first.state()}, name="1px")
    assert both.result() == res


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(DiffprobeError):
        pck(np.zeros((3, 2)), np.zeros((2, 2)), threshold_pixels(1))
    with pytest.raises(DiffprobeError):
        pck(np.zeros((3, 2)), np.zeros((3, 2)), 5.0)
    with pytest.raises(DiffprobeError):
        threshold_bbox_max_side([5, 5, 5, 5])
    with pytest.raises(DiffprobeError):
        threshold_image_max_side(10, 10, alpha=0)
    with pytest.raises(DiffprobeError, match="does not fit"):
        pck(np.zeros((2, 3, 2)), np.zeros((2, 3, 2)), threshold_image_max_side([1, 2, 3], [1, 2, 3]))
