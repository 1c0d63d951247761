"""Word heat maps from cross-attention captured over a pass, aggregated as the peer tools do (shared by the
benchmarks and the tasks; pure tensor code).

- DAAM (Tang et al., ACL 2023; castorini/daam v0.2.0): each (layer, head) map summed over the calls, bicubic-upsampled
  to the finest cross-attention grid, clamped at 0, averaged over every (layer, head) pair; layers at 1/8 of the
  latent's side are skipped (DAAM's factor-8 rule); a word's map is the mean of its tokens' rows.
- attention-map-diffusers (wooyeolbaek, 0.1.5): each (call, layer) map summed over heads, bilinearly resized to the
  grid of the first layer stored, averaged over every (call, layer) entry; no normalisation. Its per-token maps have
  no word merge: a word's map here is the sum of its tokens' rows (diffprobe's word rule).

Every map goes in as (heads, Q, T), Q = h * w positions of its grid, T text columns, the calls already summed or
averaged (both tools' step sums are linear, so a capture's running mean gives the same maps up to one positive
factor, which the min-max normalisation of a heat map removes).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from diffprobe.errors import DiffprobeError
from diffprobe.hooks import Site

DAAM_SKIPPED_DIVISOR = 8   # DAAM keeps a layer unless its map is 1/8 of the latent's side


def daam_sites(sites: Mapping[str, Site]) -> list[str]:
    """The cross-attention sites DAAM reads: every one but a UNet's mid block's (its locator takes the up and down
    blocks; the mid block only when saving heads); a transformer's every block (DAAM has no transformer code)."""
    return [n for n, s in sites.items() if s.kind == "cross_attn" and s.direction != "mid"]


def _token_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(heads, Q, T) -> (heads, T, h, w)."""
    if maps.shape[1] != grid[0] * grid[1]:
        raise DiffprobeError(f"a cross-attention map of {maps.shape[1]} positions does not fit its grid {grid}")
    return rearrange(maps.float(), "n (h w) t -> n t h w", h=grid[0], w=grid[1])


def _words(rows: torch.Tensor, groups: Sequence[Sequence[int]], how: str) -> torch.Tensor:
    """(T, h, w) token maps -> (n, h, w) word maps, each the mean or sum of its tokens' rows."""
    picked = [rows[list(g)] for g in groups]
    return torch.stack([p.mean(0) if how == "mean" else p.sum(0) for p in picked])


def daam_word_maps(layers: Sequence[tuple[int, tuple[int, int], torch.Tensor]],
                   groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """DAAM's global heat map per word: layers [(divisor, (h, w), maps (heads, Q, T))] -> (n words, H0, W0) on the
    finest kept grid."""
    kept = [(grid, m) for divisor, grid, m in layers if divisor != DAAM_SKIPPED_DIVISOR]
    if not kept:
        raise DiffprobeError("DAAM's aggregation keeps no layer: every cross-attention map is at 1/8 of the latent")
    top = max((grid for grid, _ in kept), key=lambda g: g[0] * g[1])
    total, pairs = 0.0, 0
    for grid, m in kept:
        per_head = _token_grid(m, grid)                                  # (heads, T, h, w)
        up = F.interpolate(per_head, size=top, mode="bicubic").clamp_(min=0)
        total = total + reduce(up, "n t h w -> t h w", "sum")
        pairs += per_head.shape[0]
    return _words(total / pairs, groups, "mean")


def daam_image_maps(layers: Sequence[tuple[int, tuple[int, int], torch.Tensor]], groups: Sequence[Sequence[int]],
                    grid_factor: int) -> torch.Tensor:
    """DAAM's word maps at the image's size: daam_word_maps, then upsampled bicubically from the finest kept grid
    (each cell `divisor * grid_factor` image pixels) and clamped at 0, as DAAM's expand_image -> (n, H, W)."""
    words = daam_word_maps(layers, groups)
    kept = [d for d, _, _ in layers if d != DAAM_SKIPPED_DIVISOR]
    size = tuple(g * min(kept) * grid_factor for g in words.shape[-2:])
    return F.interpolate(words[None], size=size, mode="bicubic").clamp_(min=0)[0]


def amd_word_maps(layers: Sequence[tuple[tuple[int, int], torch.Tensor]],
                  groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """attention-map-diffusers' mean map per word: layers [((h, w), maps (heads, Q, T))] in the order the model
    runs them -> (n words, h, w) on the first layer's grid."""
    if not layers:
        raise DiffprobeError("attention-map-diffusers' aggregation needs at least one cross-attention map")
    first = layers[0][0]
    total = 0.0
    for grid, m in layers:
        heads = reduce(_token_grid(m, grid), "n t h w -> 1 t h w", "sum")
        total = total + F.interpolate(heads, size=first, mode="bilinear", align_corners=False)[0]
    return _words(total / len(layers), groups, "sum")
