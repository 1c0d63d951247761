"""Gaussian targets and point read-out (argmax, windowed soft-argmax) on maps (..., H, W).

Points are (x, y) in pixels of the map with pixel centres at i + 0.5.
"""

from __future__ import annotations

import torch


def pixel_centres(h: int, w: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (H, W) of pixel centres: x and y."""
    ys = torch.arange(h, device=device, dtype=dtype) + 0.5
    xs = torch.arange(w, device=device, dtype=dtype) + 0.5
    return xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)


def gaussian_maps(centres: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Unnormalised Gaussians of peak 1: centres (..., 2) pixel (x, y) -> (..., H, W)."""
    xs, ys = pixel_centres(*size, device=centres.device, dtype=centres.dtype)
    dx = xs - centres[..., 0, None, None]
    dy = ys - centres[..., 1, None, None]
    return torch.exp(-(dx * dx + dy * dy) / (2.0 * sigma * sigma))


def argmax_points(maps: torch.Tensor) -> torch.Tensor:
    """Pixel centre (x, y) of each map's maximum: (..., H, W) -> (..., 2); ties take the first in row-major order."""
    h, w = maps.shape[-2:]
    idx = maps.flatten(-2).argmax(dim=-1)
    return torch.stack([(idx % w).to(maps.dtype), torch.div(idx, w, rounding_mode="floor").to(maps.dtype)], -1) + 0.5


def soft_argmax_points(maps: torch.Tensor, radius: float = 3.0) -> torch.Tensor:
    """Centroid of each map's values within `radius` px of its argmax: (..., H, W) -> (..., 2).

    Restricting to a window keeps background mass from pulling the point towards the image centre;
    sub-pixel precision comes from the values around the peak. Negative values are clipped to 0.
    """
    peak = argmax_points(maps)
    xs, ys = pixel_centres(*maps.shape[-2:], device=maps.device, dtype=maps.dtype)
    near = (xs - peak[..., 0, None, None]) ** 2 + (ys - peak[..., 1, None, None]) ** 2 <= radius * radius
    wts = maps.clamp_min(0) * near
    total = wts.flatten(-2).sum(-1)
    cx = (wts * xs).flatten(-2).sum(-1) / total
    cy = (wts * ys).flatten(-2).sum(-1) / total
    soft = torch.stack([cx, cy], -1)
    return torch.where((total > 0).unsqueeze(-1), soft, peak)


def peak_values(maps: torch.Tensor) -> torch.Tensor:
    """Maximum of each map (..., H, W) -> (...): the per-point confidence."""
    return maps.flatten(-2).amax(dim=-1)
