"""Localisation and equivariance losses: zero on perfect planted maps, positive otherwise."""

import torch

from diffprobe.heads.keypoints.affine import affine_matrix, warp
from diffprobe.heads.keypoints.losses import equivariance_loss, localisation_loss
from diffprobe.heads.keypoints.targets import gaussian_maps

SIZE = (32, 32)
CENTRES = torch.tensor([[12.5, 10.5], [20.5, 18.5], [14.5, 21.5]])


def test_localisation_zero_on_peak_one_gaussians_at_pixel_centres():
    maps = gaussian_maps(CENTRES, SIZE, sigma=2.0)
    assert localisation_loss(maps, sigma=2.0) < 1e-12
    assert localisation_loss(0.5 * maps, sigma=2.0) > 1e-3                     # too weak
    assert localisation_loss(gaussian_maps(CENTRES, SIZE, 4.0), sigma=2.0) > 1e-3   # too wide
    two = maps + gaussian_maps(CENTRES.flip(0), SIZE, 2.0)
    assert localisation_loss(two.clamp(max=1), sigma=2.0) > 1e-3                # a second mode


def test_equivariance_zero_when_maps_follow_the_transform():
    maps = gaussian_maps(CENTRES, SIZE, sigma=2.0)
    # a quarter turn plus a 2-pixel shift is exact on the pixel grid (align_corners=False)
    theta = affine_matrix(90.0, 1.0, 4.0 / SIZE[1], 0.0).unsqueeze(0)
    maps_t = warp(maps.unsqueeze(0), theta)[0]       # what a perfectly equivariant model would give
    for masked in (False, True):
        assert equivariance_loss(maps, maps_t, theta, masked=masked) < 1e-8
    wrong = torch.roll(maps_t, shifts=3, dims=-1)
    assert equivariance_loss(maps, wrong, theta) > 1e-4
    assert equivariance_loss(maps, wrong, theta, masked=True) > 1e-4


def test_masked_variant_ignores_pixels_that_left_the_view():
    maps = torch.ones(1, *SIZE)
    theta = affine_matrix(0.0, 1.0, 1.0, 0.0).unsqueeze(0)        # half the image leaves the view
    maps_t = warp(maps.unsqueeze(0), theta)[0]
    assert equivariance_loss(maps, maps_t, theta) > 0.4               # reference: missing half counts
    assert equivariance_loss(maps, maps_t, theta, masked=True) < 1e-8


def test_losses_carry_gradients():
    maps = gaussian_maps(CENTRES, SIZE, sigma=3.0).requires_grad_(True)
    theta = affine_matrix(10.0, 0.9, 0.1, 0.0).unsqueeze(0)
    loss = localisation_loss(maps, 2.0) + equivariance_loss(maps, maps.roll(1, -1), theta)
    loss.backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0
