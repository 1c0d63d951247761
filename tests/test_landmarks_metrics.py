"""The bias-free regressor and the landmark metrics against hand-computed answers."""

import numpy as np
import pytest

from diffprobe.errors import DiffprobeError
from diffprobe.eval.landmarks import (apply_regressor, deepfashion_pck, fit_regressor, inter_ocular_error,
                                      summed_l2, swap_invariant_l2, visible_error, wild_mask)


def test_regressor_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    found = rng.uniform(0, 1, (200, 4, 2))
    W_true = rng.normal(0, 0.3, (8, 6))
    gt = ((found - 0.5).reshape(200, -1) @ W_true).reshape(200, 3, 2) + 0.5
    W = fit_regressor(found, gt)
    np.testing.assert_allclose(W, W_true, atol=1e-8)
    np.testing.assert_allclose(apply_regressor(W, found), gt, atol=1e-8)


def test_regressor_fits_each_target_on_its_visible_rows():
    rng = np.random.default_rng(1)
    found = rng.uniform(0, 1, (100, 3, 2))
    W_true = rng.normal(0, 0.3, (6, 4))
    gt = ((found - 0.5).reshape(100, -1) @ W_true).reshape(100, 2, 2) + 0.5
    visible = np.ones((100, 2), bool)
    visible[:40, 1] = False
    gt[:40, 1] = 0.0                     # invisible landmarks hold junk: it must not leak into the fit
    W = fit_regressor(found, gt, visible)
    np.testing.assert_allclose(W, W_true, atol=1e-8)
    visible[:, 0] = False
    with pytest.raises(DiffprobeError, match="never visible"):
        fit_regressor(found, gt, visible)


def test_inter_ocular_error_and_wild_filter():
    gt = np.array([[[0.3, 0.4], [0.7, 0.4], [0.5, 0.5], [0.35, 0.7], [0.65, 0.7]]])   # eyes 0.4 apart
    pred = gt.copy()
    pred[0, 2] += (0.03, 0.04)            # nose off by 0.05
    res = inter_ocular_error(pred, gt)
    assert res["inter_ocular_error_percent"] == pytest.approx(0.05 / 5 / 0.4 * 100)
    np.testing.assert_array_equal(wild_mask([[0, 0, 50, 60], [0, 0, 50, 50]], [[100, 100], [100, 100]]),
                                  [True, False])


def test_cub_taichi_h36m_and_deepfashion():
    gt = np.array([[[0.1, 0.1], [0.5, 0.5], [0.9, 0.2]]])
    pred = gt + np.array([[[0.03, 0.04], [0.0, 0.1], [0.5, 0.5]]])
    vis = np.array([[True, True, False]])
    assert visible_error(pred, gt, vis)["mean_l2"] == pytest.approx((0.05 + 0.1) / 2)
    assert summed_l2(pred, gt, vis)["summed_l2_at_256px"] == pytest.approx((0.05 + 0.1) * 256)
    # two images with 2 and 1 visible points: the reference averages per image first, then over images
    gt2, pred2 = np.concatenate([gt, gt]), np.concatenate([pred, gt + np.array([0.3, 0.4])])
    vis2 = np.array([[True, True, False], [False, True, False]])
    res = visible_error(pred2, gt2, vis2)
    assert res["mean_l2"] == pytest.approx(((0.05 + 0.1) / 2 + 0.5) / 2)
    assert res["mean_l2_pooled"] == pytest.approx((0.05 + 0.1 + 0.5) / 3)
    assert res["num_images"] == 2 and res["num_points"] == 3
    mirrored = gt[:, [2, 1, 0]]
    res = swap_invariant_l2(mirrored, gt, swap=[(0, 2)])
    assert res["swap_invariant_l2_x128"] == pytest.approx(0.0)
    assert swap_invariant_l2(mirrored, gt, swap=[])["swap_invariant_l2_x128"] > 10
    # at 256 px the errors are 12.8 px, 25.6 px and far: none within 6 px; exact copies all are
    assert deepfashion_pck(pred, gt, vis)["pck@6px_per_point"] == 0.0
    close = gt + 5.0 / 256 * np.array([0.6, 0.8])      # 5 px away
    assert deepfashion_pck(close, gt)["pck@6px_per_point"] == 1.0
