"""Optional semantic labels: name each segment with one of the user's words by cross-attention voting.

The reference captions the image and votes with the caption nouns' cross-attention; here the words
come from the user. Cross-attention maps of each resolution are keyed by their query grid like the
self-attention maps, each (Q, T) or (L, Q, T) over the T context tokens.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError
from diffprobe.heads.diffseg.aggregate import as_grid, resolution_weights


def word_maps(cross_by_grid: Mapping, token_groups: Sequence[Sequence[int]], size: tuple[int, int],
              weights: Sequence[float] | Mapping | None = None) -> torch.Tensor:
    """(n_words, H, W): for each word (a group of token positions), the sum of its tokens' maps,
    upsampled bilinearly to `size` and aggregated over resolutions with the head's weights.

    The reference renormalises each pixel over all tokens after upsampling; bilinear upsampling of
    rows that already sum to 1 keeps that sum, so selecting the word tokens first is equivalent.
    """
    items = {as_grid(k): v.mean(dim=0) if v.dim() == 3 else v for k, v in cross_by_grid.items()}
    grids = sorted(items, key=lambda g: -g[0] * g[1])
    ratios = resolution_weights(grids, weights)
    out = torch.zeros(len(token_groups), *size)
    for grid, r in zip(grids, ratios):
        maps = items[grid].float()
        if maps.shape[0] != grid[0] * grid[1]:
            raise DiffprobeError(f"cross-attention maps for grid {grid} have {maps.shape[0]} queries")
        words = torch.stack([maps[:, list(group)].sum(dim=1) for group in token_groups])  # (n, Q)
        up = F.interpolate(words.reshape(-1, 1, *grid), size=size, mode="bilinear", align_corners=False)
        out += r * up[:, 0]
    return out


def vote_words(labels: torch.Tensor, maps: torch.Tensor) -> list[int]:
    """For every label 0..K-1 of `labels` (H, W), the index of the word whose map (n_words, H, W),
    L2-normalised over the image (ref), has the highest mean inside that segment."""
    if maps.shape[1:] != labels.shape:
        raise DiffprobeError(f"word maps {tuple(maps.shape[1:])} and labels {tuple(labels.shape)} differ in size")
    flat = maps.reshape(maps.shape[0], -1).double()
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    lab = labels.reshape(-1)
    k = int(lab.max()) + 1
    counts = torch.bincount(lab, minlength=k).double()
    sums = torch.stack([torch.bincount(lab, weights=row, minlength=k) for row in flat])  # (n_words, K)
    means = sums / counts.clamp_min(1)[None, :]
    return means.argmax(dim=0).tolist()
