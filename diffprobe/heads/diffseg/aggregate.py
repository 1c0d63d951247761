"""Attention aggregation: self-attention maps of every resolution onto the finest query/key grid.

Input maps are keyed by their query grid, `(h, w)` (an int `s` means `(s, s)`), each a tensor
(Q, K) with Q = K = h*w in row-major order, or (L, Q, K) for L layers of that grid (averaged, as the
reference does). For each grid (h, w) with the finest grid (H, W) = (h*fh, w*fw):
  1. key maps are upsampled bilinearly to (H, W) and renormalised to sum 1 (ref);
  2. the aggregated query (I, J) takes the map of query (I // fh, J // fw) (nearest duplication);
  3. the maps are summed with weights R proportional to sqrt(h*w) (ref: 64, 32, 16, 8 over 120).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError

Grid = tuple[int, int]


def as_grid(key: int | Sequence[int]) -> Grid:
    """(h, w) from an int side or a pair."""
    if isinstance(key, int):
        return (key, key)
    h, w = key
    return (int(h), int(w))


def layer_mean(maps: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(Q, K) from (Q, K) or (L, Q, K) (mean over layers); checks Q = K = h*w."""
    n = grid[0] * grid[1]
    if maps.dim() == 3:
        maps = maps.mean(dim=0)
    if maps.dim() != 2 or maps.shape != (n, n):
        raise DiffprobeError(f"maps for grid {grid} must be ({n}, {n}) or (L, {n}, {n}), got {tuple(maps.shape)}")
    return maps


def normalise_inputs(maps_by_grid: Mapping) -> dict[Grid, torch.Tensor]:
    """Grids sorted finest first, each with its layer-mean (Q, K) tensor."""
    if not maps_by_grid:
        raise DiffprobeError("no self-attention maps given")
    items = {as_grid(k): v for k, v in maps_by_grid.items()}
    return {g: layer_mean(items[g], g) for g in sorted(items, key=lambda g: -g[0] * g[1])}


def resolution_weights(grids: Sequence[Grid], weights: Sequence[float] | Mapping | None = None) -> list[float]:
    """Weights per grid summing to 1: proportional to sqrt(h*w) by default (the reference),
    else given as a sequence aligned with `grids` (finest first) or a mapping grid/side -> weight."""
    if weights is None:
        raw = [float((h * w) ** 0.5) for h, w in grids]
    elif isinstance(weights, Mapping):
        by_grid = {as_grid(k): float(v) for k, v in weights.items()}
        missing = [g for g in grids if g not in by_grid]
        if missing:
            raise DiffprobeError(f"no aggregation weight for grids {missing}")
        raw = [by_grid[g] for g in grids]
    else:
        try:
            raw = [float(v) for v in weights]
        except (TypeError, ValueError):
            raise DiffprobeError(f"aggregation weights must be numbers, got {weights!r}") from None
        if len(raw) != len(grids):
            raise DiffprobeError(f"{len(raw)} aggregation weights for {len(grids)} resolutions")
    if any(v < 0 for v in raw) or sum(raw) <= 0:
        raise DiffprobeError(f"aggregation weights must be non-negative with a positive sum, got {raw}")
    total = sum(raw)
    return [v / total for v in raw]


def query_index(grid: Grid, fine: Grid) -> torch.Tensor:
    """For every fine query (row-major), the index of the coarse query it duplicates, shape (H*W,)."""
    (h, w), (H, W) = grid, fine
    if H % h or W % w:
        raise DiffprobeError(f"grid {grid} does not divide the finest grid {fine}")
    rows = torch.arange(H) // (H // h)
    cols = torch.arange(W) // (W // w)
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


def upsample_keys(maps: torch.Tensor, grid: Grid, fine: Grid) -> torch.Tensor:
    """(Q, h*w) -> (Q, H*W): bilinear (half-pixel centres) upsampling of every key map, renormalised."""
    if grid == fine:
        up = maps
    else:
        up = F.interpolate(maps.reshape(-1, 1, *grid), size=fine, mode="bilinear", align_corners=False)
        up = up.reshape(maps.shape[0], -1)
    return up / up.sum(dim=1, keepdim=True)


def aggregate(maps_by_grid: Mapping, weights: Sequence[float] | Mapping | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Grid]:
    """A_f (H*W, H*W) in `dtype`, each row a distribution over the finest grid, and that grid (H, W)."""
    maps = normalise_inputs(maps_by_grid)
    grids = list(maps)
    fine = grids[0]
    ratios = resolution_weights(grids, weights)
    out = None
    for grid, r in zip(grids, ratios):
        if r == 0:
            continue
        up = upsample_keys(maps[grid].to(dtype), grid, fine)
        term = up if grid == fine else up[query_index(grid, fine)]
        out = term * r if out is None else out.add_(term, alpha=r)
    return out, fine
