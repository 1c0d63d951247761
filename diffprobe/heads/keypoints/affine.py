"""Random affine transforms with exact inverses, applied to images and attention maps.

A transform is a batch of matrices theta (B, 2, 3) in F.affine_grid's convention: it maps a point of
the *output* in normalised coordinates ([-1, 1], x then y, align_corners=False) to the point of the
input it is sampled from, in = A @ out + t. Scale s < 1 therefore zooms in by 1/s. The inverse is the
exact matrix inverse, so warp(., invert_affine(theta)) undoes warp(., theta) wherever the content
stayed in view (up to bilinear resampling of the grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError


@dataclass(frozen=True)
class AffineRange:
    """Uniform ranges of the random transform (reference values: +-15 deg, scale 0.8..1.0, shift +-0.25).

    degrees: max rotation; scale: (low, high) factor of theta; translate: max shift in normalised units
    (0.25 = 12.5 % of the width).
    """

    degrees: float = 15.0
    scale: tuple[float, float] = (0.8, 1.0)
    translate: float = 0.25

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise DiffprobeError(f"affine scale range must satisfy 0 < low <= high, got {self.scale}")
        if self.degrees < 0 or self.translate < 0:
            raise DiffprobeError("affine degrees and translate must be non-negative")


def affine_matrix(degrees: float, scale: float, tx: float, ty: float) -> torch.Tensor:
    """theta (2, 3) for a rotation by `degrees`, isotropic `scale` and translation (tx, ty)."""
    a = math.radians(degrees)
    c, s = math.cos(a) * scale, math.sin(a) * scale
    return torch.tensor([[c, -s, tx], [s, c, ty]], dtype=torch.float32)


def sample_affine(n: int, rng: AffineRange, generator: torch.Generator | None = None) -> torch.Tensor:
    """n random transforms (n, 2, 3), each parameter uniform in its range."""
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    lo, hi = rng.scale
    return torch.stack([
        affine_matrix(
            float((2 * u[i, 0] - 1) * rng.degrees), float(lo + u[i, 1] * (hi - lo)),
            float((2 * u[i, 2] - 1) * rng.translate), float((2 * u[i, 3] - 1) * rng.translate),
        )
        for i in range(n)
    ])


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Exact inverse transforms (B, 2, 3): in = A out + t  <=>  out = A^-1 in - A^-1 t."""
    a_inv = torch.linalg.inv(theta[:, :, :2].double())
    t = theta[:, :, 2:].double()
    return torch.cat([a_inv, -a_inv @ t], dim=2).to(theta.dtype)


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample x (B, C, H, W) by theta (B, 2, 3) (or (1, 2, 3), broadcast); zeros outside the input."""
    if theta.shape[0] != x.shape[0]:
        theta = theta.expand(x.shape[0], 2, 3)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_image(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """warp() for images x (B, 3, H, W) in [-1, 1] with out-of-view pixels black (-1), as the reference
    warps its images in [0, 1] before scaling them to [-1, 1]."""
    return warp((x + 1) * 0.5, theta) * 2 - 1


def unwarp(y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bring y = warp(x, theta) back to x's frame (B, C, H, W); regions that left the view are zero."""
    return warp(y, invert_affine(theta))


def map_points(points: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Where content at `points` (B, P, 2) pixel (x, y) of the input appears after warp(., theta).

    size: (H, W) of the grid, pixel centres at i + 0.5.
    """
    h, w = size
    scale = points.new_tensor([w / 2.0, h / 2.0])
    norm = points / scale - 1.0                                       # pixels -> [-1, 1]
    inv = invert_affine(theta).to(points.dtype)
    out = norm @ inv[:, :, :2].transpose(1, 2) + inv[:, :, 2].unsqueeze(1)
    return (out + 1.0) * scale
