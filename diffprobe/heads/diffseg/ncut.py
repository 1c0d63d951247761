"""Segmentation by recursive normalised cut (DiffCut, NeurIPS 2024) on DiffSeg's aggregated self-attention.

DiffCut cuts a graph of a diffusion UNet's features: the affinity is the cosine similarity of the
positions' features, min-max normalised and raised to alpha (ref 10), cut recursively while the best
cut's Ncut is below tau (ref 0.5); each segment's mean feature then labels every pixel of the upsampled
feature map. Here the features are the rows of the same aggregated self-attention DiffSeg merges (each
position's attention map over the image), so one call serves both methods: `attention_rows` is DiffCut's
affinity on those rows, `attention` the symmetrised attention itself, (P + P^T) / 2, and `walk` the flow of a
k-step random walk on P ("Diffusing, Walking and Cutting", WACV 2026; diffprobe.graph.walk_graph). A segment's mean row
is its attention map, and pixels take the segment whose map is largest there, as DiffSeg's final step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.graph import attention_graph, cosine_affinity, recursive_ncut, walk_graph
from diffprobe.heads.diffseg.aggregate import aggregate
from diffprobe.heads.diffseg.segment import SegmentationResult, compact_labels, non_max_suppression

AFFINITIES = ("attention_rows", "attention", "walk")


@dataclass(frozen=True)
class NcutSettings:
    """tau: stop splitting a part when its best cut's Ncut is not below this (ref 0.5); alpha: the affinity
    exponent (ref 10; attention_rows only); affinity: one of AFFINITIES; walk_steps: k of the walk affinity's
    P^k; weights: aggregation weights per resolution (None: DiffSeg's); max_segments: at most this many segments."""

    tau: float = 0.5
    alpha: float = 10.0
    affinity: str = "attention_rows"
    walk_steps: int = 1
    weights: object = None
    max_segments: int = 64

    def __post_init__(self):
        if self.affinity not in AFFINITIES:
            raise DiffprobeError(f"ncut_affinity must be one of {', '.join(AFFINITIES)}, not {self.affinity!r}")
        if self.walk_steps < 1:
            raise DiffprobeError(f"ncut_walk_steps must be at least 1, got {self.walk_steps}")
        if self.tau <= 0 or self.alpha <= 0:
            raise DiffprobeError(f"ncut_tau and ncut_alpha must be > 0, got {self.tau} and {self.alpha}")


def affinity_of(maps: torch.Tensor, params: NcutSettings) -> torch.Tensor:
    """(Q, Q) affinity of the aggregated attention maps (Q, Q)."""
    if params.affinity == "attention":
        return attention_graph(maps).weights
    if params.affinity == "walk":
        return walk_graph(maps, params.walk_steps).weights
    return cosine_affinity(maps, params.alpha)


def ncut_segment(maps_by_grid: Mapping, size: tuple[int, int], params: NcutSettings | None = None) -> SegmentationResult:
    """Segment one image from its self-attention maps ({grid: (Q, Q) or (L, Q, Q)}, heads averaged) into
    labels of `size` (H, W); `counts` holds the number of segments on the attention grid."""
    params = params or NcutSettings()
    maps, grid = aggregate(maps_by_grid, params.weights)
    cells, _ = recursive_ncut(affinity_of(maps, params), params.tau, max_segments=params.max_segments)
    k = int(cells.max()) + 1
    proposals = torch.zeros(k, maps.shape[1], dtype=maps.dtype).index_add_(0, cells, maps)
    proposals /= torch.bincount(cells, minlength=k).to(maps.dtype)[:, None]
    labels, proposals = compact_labels(non_max_suppression(proposals, grid, size), proposals)
    return SegmentationResult(labels=labels, proposals=proposals.reshape(-1, *grid).float(), grid=grid, counts=[k])
