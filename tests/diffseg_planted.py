"""Planted self-attention built from a known segmentation, for the tests and benchmarks of the DiffSeg head.

Each query attends uniformly to the pixels of its own region (plus a small floor), at any grid; the
head must return that segmentation up to a permutation of labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_segmentation(side: int = 16) -> torch.Tensor:
    """(side, side) int64 map of 5 regions with boundaries on multiples of side/4."""
    q = side // 4
    seg = torch.zeros(side, side, dtype=torch.long)
    seg[q:, :q] = 1
    seg[q:3 * q, q:3 * q] = 2
    seg[3 * q:, q:] = 3
    seg[q:3 * q, 3 * q:] = 4
    return seg


def voronoi_segmentation(side: int, regions: int, seed: int = 0) -> torch.Tensor:
    """(side, side) int64 map: each pixel labelled by its nearest of `regions` random seed points."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(regions, 2, generator=gen) * side
    ys, xs = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    dist = (ys[..., None] - centres[:, 0]) ** 2 + (xs[..., None] - centres[:, 1]) ** 2
    return dist.argmin(dim=-1)


def planted_attention(seg: torch.Tensor, side: int, layers: int = 1, noise: float = 0.0,
                      floor: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """(layers, side^2, side^2) float32: each query of `seg` nearest-resized to side x side attends
    uniformly to its own region, plus `floor` and optional multiplicative noise in [1, 1 + noise].
    The default floor keeps every probability above float16's smallest value (the reference numerics
    of DiffSeg's iteration 0 turn smaller ones into zeros); 1e-6 puts the background below it."""
    small = F.interpolate(seg[None, None].float(), size=(side, side), mode="nearest")[0, 0].long().reshape(-1)
    out = ((small[:, None] == small[None, :]).float() + floor).expand(layers, -1, -1).clone()
    if noise:
        out *= 1 + noise * torch.rand(out.shape, generator=torch.Generator().manual_seed(seed))
    return out / out.sum(dim=-1, keepdim=True)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when label maps a and b are equal up to a permutation of labels."""
    pairs = torch.unique(torch.stack([a.reshape(-1), b.reshape(-1)]), dim=1)
    return pairs.shape[1] == len(torch.unique(a)) == len(torch.unique(b))
