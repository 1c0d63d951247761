"""Affine transforms, their inverses and point read-out on planted maps."""

import math

import torch

from diffprobe.heads.keypoints.affine import (AffineRange, affine_matrix, invert_affine, map_points,
                                              sample_affine, unwarp, warp)
from diffprobe.heads.keypoints.targets import (argmax_points, gaussian_maps, peak_values,
                                               soft_argmax_points)


def test_inverse_is_exact_and_ranges_hold():
    g = torch.Generator().manual_seed(0)
    theta = sample_affine(64, AffineRange(degrees=15, scale=(0.8, 1.0), translate=0.25), generator=g)
    a = theta[:, :, :2]
    scale = torch.sqrt(torch.det(a))
    assert (scale >= 0.8 - 1e-5).all() and (scale <= 1.0 + 1e-5).all()
    angle = torch.rad2deg(torch.atan2(a[:, 1, 0], a[:, 0, 0]))
    assert angle.abs().max() <= 15 + 1e-4
    assert theta[:, :, 2].abs().max() <= 0.25
    inv = invert_affine(theta)

    def full(t):
        return torch.cat([t, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(t.shape[0], 1, 3)], 1)

    torch.testing.assert_close(full(inv) @ full(theta), torch.eye(3).expand(64, 3, 3), atol=1e-5, rtol=0)


def test_map_round_trip_recovers_smooth_maps_in_view():
    size = (64, 64)
    maps = gaussian_maps(torch.tensor([[[20.5, 30.5], [40.5, 26.5]]]), size, sigma=4.0)   # (1, 2, 64, 64)
    theta = affine_matrix(12.0, 0.85, 0.1, -0.08).unsqueeze(0)
    back = unwarp(warp(maps, theta), theta)
    assert (back - maps).abs().max() < 0.03        # bilinear resampling twice on a smooth map
    torch.testing.assert_close(argmax_points(back), argmax_points(maps))


def test_warp_moves_points_where_map_points_says():
    size = (64, 64)
    pts = torch.tensor([[[20.5, 30.5], [40.5, 22.5]]])
    theta = affine_matrix(-10.0, 0.9, -0.12, 0.05).unsqueeze(0)
    warped = warp(gaussian_maps(pts, size, sigma=3.0), theta)
    expect = map_points(pts, theta, size)
    assert (soft_argmax_points(warped, radius=10) - expect).abs().max() < 0.15
    torch.testing.assert_close(map_points(expect, invert_affine(theta), size), pts, atol=1e-4, rtol=0)


def test_quarter_turn_is_exact_on_the_grid():
    x = torch.rand(1, 3, 8, 8)
    theta = affine_matrix(90.0, 1.0, 0.0, 0.0).unsqueeze(0)
    torch.testing.assert_close(warp(x, theta), torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(unwarp(warp(x, theta), theta), x, atol=1e-5, rtol=0)


def test_argmax_soft_argmax_and_peaks():
    maps = torch.zeros(2, 6, 8)
    maps[0, 2, 5] = 1.0
    maps[1, 4, 1] = 0.5
    maps[1, 4, 2] = 0.5       # tie: first in row-major order wins for argmax, centroid between them
    torch.testing.assert_close(argmax_points(maps), torch.tensor([[5.5, 2.5], [1.5, 4.5]]))
    torch.testing.assert_close(soft_argmax_points(maps), torch.tensor([[5.5, 2.5], [2.0, 4.5]]))
    torch.testing.assert_close(peak_values(maps), torch.tensor([1.0, 0.5]))
    g = gaussian_maps(torch.tensor([3.5, 2.5]), (6, 8), sigma=2.0)
    assert g[2, 3] == 1.0 and math.isclose(float(g[2, 5]), math.exp(-4 / 8), rel_tol=1e-6)
