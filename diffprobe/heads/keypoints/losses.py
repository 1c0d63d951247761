"""Localisation and equivariance losses on selected cross-attention maps (K, H, W)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffprobe.heads.keypoints.affine import unwarp
from diffprobe.heads.keypoints.targets import argmax_points, gaussian_maps


def localisation_loss(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """MSE over all pixels between each map and a peak-1 Gaussian (std `sigma` px) at its own argmax."""
    target = gaussian_maps(argmax_points(maps.detach()), maps.shape[-2:], sigma)
    return F.mse_loss(maps, target)


def equivariance_loss(maps: torch.Tensor, maps_warped: torch.Tensor, theta: torch.Tensor,
                      masked: bool = False) -> torch.Tensor:
    """MSE between maps of x (K, H, W) and the maps of warp(x, theta) brought back by the inverse.

    theta (1, 2, 3). masked=False (reference): pixels that left the view count as zeros. masked=True:
    the mean runs only over pixels that stayed in view (a warped ones-mask above 0.5).
    """
    back = unwarp(maps_warped.unsqueeze(0), theta)[0]
    if not masked:
        return F.mse_loss(maps, back)
    ones = torch.ones(1, 1, *maps.shape[-2:], device=maps.device, dtype=maps.dtype)
    valid = (unwarp(ones, theta)[0, 0] > 0.5).to(maps.dtype)
    return ((maps - back) ** 2 * valid).sum() / (valid.sum() * maps.shape[0]).clamp_min(1.0)
