"""Planted self-attention built from a known segmentation (shared by the DiffSeg tests and benchmark)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def planted_segmentation(side: int = 16) -> torch.Tensor:
    """(side, side) int64 map of 5 regions, boundaries on multiples of side/4."""
    q = side // 4
    seg = torch.zeros(side, side, dtype=torch.long)
    seg[q:, :q] = 1
    seg[q:3 * q, q:3 * q] = 2
    seg[3 * q:, q:] = 3
    seg[q:3 * q, 3 * q:] = 4
    return seg


def planted_attention(seg: torch.Tensor, side: int, layers: int = 1, noise: float = 0.0,
                      floor: float = 1e-6, seed: int = 0) -> torch.Tensor:
    """(layers, side^2, side^2): each query of the seg (nearest-resized to side x side) attends
    uniformly to the pixels of its own region, plus a small floor and optional multiplicative noise."""
    small = F.interpolate(seg[None, None].float(), size=(side, side), mode="nearest")[0, 0].long().reshape(-1)
    same = (small[:, None] == small[None, :]).float() + floor
    gen = torch.Generator().manual_seed(seed)
    out = same.expand(layers, -1, -1).clone()
    if noise:
        out *= 1 + noise * torch.rand(out.shape, generator=gen)
    return out / out.sum(dim=-1, keepdim=True)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when label maps a and b are equal up to a permutation of labels."""
    pairs = torch.unique(torch.stack([a.reshape(-1), b.reshape(-1)]), dim=1)
    return pairs.shape[1] == len(torch.unique(a)) == len(torch.unique(b))
