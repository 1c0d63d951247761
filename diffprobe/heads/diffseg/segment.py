"""DiffSeg end to end on captured tensors: aggregate, merge, optionally refine, NMS at the output size."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError
from diffprobe.heads.diffseg.aggregate import Grid, aggregate
from diffprobe.heads.diffseg.distance import DEFAULT_EPS
from diffprobe.heads.diffseg.merge import MERGE_MODES, anchor_indices, initial_proposals, kmeans_refine, merge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentSettings:
    """Hyper-parameters of the head (defaults: the reference's demo settings).

    tau: merge threshold on the symmetric KL, one value or one per iteration (ref 1.1 on
      COCO-Stuff-27, 0.9 on Cityscapes and demos). iterations: N >= 2 (ref 3). anchors: M, the
      anchor grid is M x M (ref 16). merge: "reference" (the reference's greedy, order-dependent
      pass, default), "leaders" (order-independent) or "components" (order-independent,
      transitive); the last two are diffprobe's own. fp16_kl: the reference's numerics (iteration 0
      on maps rounded to float16, no epsilon in any KL: maps holding a zero are never close to
      anything); None = on with merge="reference" only. weights: aggregation weights per
      resolution (None: proportional to resolution). refine: k-means refinement (ref: off).
    """

    tau: float | Sequence[float] = 0.9
    iterations: int = 3
    anchors: int = 16
    merge: str = "reference"
    fp16_kl: bool | None = None
    weights: Sequence[float] | Mapping | None = None
    refine: bool = False
    refine_iters: int = 30
    chunk: int = 1024
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.iterations < 2:
            raise DiffprobeError(f"iterations must be >= 2 (the reference requires it), got {self.iterations}")
        taus = self.taus()
        if len(taus) != self.iterations or any(t <= 0 for t in taus):
            raise DiffprobeError(f"tau must be one positive value or {self.iterations} of them, got {self.tau}")
        if self.merge not in MERGE_MODES:
            raise DiffprobeError(f"merge must be one of {MERGE_MODES}, got {self.merge!r}")
        if self.anchors < 1:
            raise DiffprobeError(f"anchors must be >= 1, got {self.anchors}")
        if self.fp16_kl and self.merge != "reference":
            raise DiffprobeError(f"fp16_kl (the reference's float16 numerics) needs merge=reference, not {self.merge}")

    @property
    def reference_numerics(self) -> bool:
        """True when the KL distances follow the reference's float16 / no-epsilon numerics."""
        return self.merge == "reference" if self.fp16_kl is None else bool(self.fp16_kl)

    def taus(self) -> list[float]:
        try:
            if isinstance(self.tau, (int, float, str)):
                return [float(self.tau)] * self.iterations
            return [float(t) for t in self.tau]
        except (TypeError, ValueError):
            raise DiffprobeError(f"tau must be a number or a list of numbers, got {self.tau!r}") from None

    def replace(self, **changes) -> "SegmentSettings":
        return dataclasses.replace(self, **changes)


@dataclass
class SegmentationResult:
    """labels: (H_out, W_out) int64, values 0..K-1, every value used. proposals: (K, h, w) float,
    the merged attention map of each label on the aggregated grid. counts: proposals after each
    merging iteration (and after refinement, if any)."""

    labels: torch.Tensor
    proposals: torch.Tensor
    grid: Grid
    counts: list[int] = field(default_factory=list)

    @property
    def num_segments(self) -> int:
        return int(self.proposals.shape[0])


def _chunk(size: tuple[int, int]) -> int:
    return max(1, min(16, 2**25 // (size[0] * size[1])))


def labels_bytes(size: tuple[int, int]) -> int:
    """Bytes non_max_suppression holds for labels of `size` (H, W): one chunk of upsampled proposals, the
    running best value and index and their updates (32 bytes a pixel)."""
    return (4 * _chunk(size) + 32) * size[0] * size[1]


def non_max_suppression(proposals: torch.Tensor, grid: Grid, size: tuple[int, int],
                        chunk: int | None = None) -> torch.Tensor:
    """Upsample (K, h*w) proposals bilinearly to `size` (H, W) and take the per-pixel argmax -> (H, W)
    int64; ties go to the lower index. Proposals are upsampled `chunk` at a time (default: at most 16
    and about 2^25 upsampled values per chunk, so large images stay within a few hundred MiB)."""
    chunk = chunk or _chunk(size)
    best_val = best_idx = None
    for start in range(0, proposals.shape[0], chunk):
        part = proposals[start:start + chunk].reshape(-1, 1, *grid)
        up = F.interpolate(part, size=size, mode="bilinear", align_corners=False)[:, 0]
        val, idx = up.max(dim=0)
        idx += start
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
    return best_idx


def compact_labels(labels: torch.Tensor, proposals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop proposals that win no pixel and renumber labels 0..K-1 in proposal order."""
    used, inverse = torch.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape), proposals[used]


def segment(maps_by_grid: Mapping, size: tuple[int, int] | None = None,
            params: SegmentSettings | None = None) -> SegmentationResult:
    """Segment one image from its self-attention probabilities.

    maps_by_grid: {(h, w) or side: (Q, K) or (L, Q, K) tensor}, Q = K = h*w, heads already averaged.
    size: (H_out, W_out) of the label map (default: 8x the finest grid, e.g. 512 for SD at 64x64).
    Deterministic: no randomness anywhere.
    """
    params = params or SegmentSettings()
    maps, grid = aggregate(maps_by_grid, params.weights, dtype=params.dtype)
    size = tuple(size) if size is not None else (8 * grid[0], 8 * grid[1])
    taus = params.taus()
    fp16 = params.reference_numerics
    proposals = initial_proposals(maps, anchor_indices(grid, params.anchors), taus[0], chunk=params.chunk, fp16=fp16)
    counts = [int(proposals.isfinite().all(dim=1).sum())]
    for tau in taus[1:]:
        proposals = merge(proposals, tau, params.merge, eps=0.0 if fp16 else DEFAULT_EPS)
        counts.append(proposals.shape[0])
    if proposals.shape[0] == 0:  # the reference fails here; one segment keeps a dataset run going
        log.warning("every DiffSeg proposal held a float16 zero and vanished (reference numerics); the image "
                    "is one segment. fp16_kl=false uses float32 distances with an epsilon instead")
        proposals = maps.mean(dim=0, keepdim=True)
    if params.refine:
        proposals = kmeans_refine(maps, proposals, params.refine_iters)
        counts.append(proposals.shape[0])
    labels = non_max_suppression(proposals, grid, size)
    labels, proposals = compact_labels(labels, proposals)
    return SegmentationResult(labels=labels, proposals=proposals.reshape(-1, *grid).float(), grid=grid,
                              counts=counts)
