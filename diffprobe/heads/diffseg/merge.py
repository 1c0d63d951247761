"""Iterative attention merging: anchors -> proposals -> merged proposals, and k-means refinement.

All functions work on flat maps: a (n, D) tensor whose rows are distributions over the D = H*W
pixels of the aggregated grid.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from diffprobe.errors import DiffprobeError
from diffprobe.heads.diffseg.distance import DEFAULT_EPS, symmetric_kl

MERGE_MODES = ("leaders", "components", "reference")


def anchor_positions(side: int, points: int) -> list[int]:
    """`points` evenly spaced, centred positions on 0..side-1 (ref: side 64, 16 points -> 1, 5, ..., 61)."""
    if not 1 <= points <= side:
        raise DiffprobeError(f"anchor points per side must be in 1..{side}, got {points}")
    if points == 1:
        return [(side - 1) // 2]
    step = (side - 1) // (points - 1)
    start = (side - 1 - step * (points - 1)) // 2
    return [start + step * k for k in range(points)]


def anchor_indices(grid: tuple[int, int], points: int) -> torch.Tensor:
    """Flat (row-major) indices of the points x points anchor grid on an (H, W) grid, row-major."""
    rows = torch.tensor(anchor_positions(grid[0], points))
    cols = torch.tensor(anchor_positions(grid[1], points))
    return (rows[:, None] * grid[1] + cols[None, :]).reshape(-1)


def initial_proposals(maps: torch.Tensor, anchors: torch.Tensor, tau: float, chunk: int = 1024,
                      fp16: bool = False) -> torch.Tensor:
    """Iteration 0: for each anchor map, the mean of all maps closer than tau to it, (len(anchors), D).

    fp16=False: distances in the maps' dtype with probabilities clamped at 1e-12; every anchor is at
    distance 0 from itself, so no row is empty. fp16=True (the reference): distances of the maps
    rounded to float16, no clamp; an anchor whose map holds a zero there is close to nothing and its
    proposal is 0/0 = NaN, as in the reference (merge_reference drops it at iteration 1).
    """
    dist = symmetric_kl(maps[anchors], maps, eps=0.0 if fp16 else DEFAULT_EPS, chunk=chunk, fp16=fp16)
    close = (dist < tau).to(maps.dtype)
    return (close @ maps) / close.sum(dim=1, keepdim=True)


def merge_reference(proposals: torch.Tensor, tau: float, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The reference's greedy pass: in index order, each proposal not yet consumed is averaged with
    every proposal closer than tau, consumed ones included; the result depends on the order.

    A proposal close to nothing, itself included (a NaN map, or with eps=0 a map holding a zero),
    forms no group, as the reference's `if kl_bin.sum() > 0`. Returns (k, D), k possibly 0."""
    close = (symmetric_kl(proposals, eps=eps) < tau).cpu().numpy()
    consumed: set[int] = set()
    merged = []
    for i in range(len(proposals)):
        if i in consumed:
            continue
        members = np.flatnonzero(close[i])
        consumed.add(i)
        consumed.update(members.tolist())
        if len(members):
            merged.append(proposals[torch.from_numpy(members)].mean(dim=0))
    return torch.stack(merged) if merged else proposals[:0]


def merge_components(proposals: torch.Tensor, tau: float) -> torch.Tensor:
    """Order-independent merge: connected components of the graph linking proposals closer than
    tau; each component becomes the mean of its members, components ordered by smallest member."""
    dist = symmetric_kl(proposals)
    close = ((dist + dist.T) * 0.5 < tau).cpu().numpy()
    _, labels = connected_components(csr_matrix(close), directed=False)
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    return torch.stack([proposals[torch.from_numpy(np.flatnonzero(labels == c))].mean(dim=0) for c in order])


def merge_leaders(proposals: torch.Tensor, tau: float) -> torch.Tensor:
    """Order-independent merge closest to the reference's pass: proposals are visited by a key of their
    content (most neighbours closer than tau first, then peak position, peak value, sum of squares),
    and each one not yet taken is averaged with its neighbours not yet taken. Groups are disjoint
    one-hop neighbourhoods (no chaining through intermediate proposals); only numerically identical
    maps can tie, and those are interchangeable."""
    dist = symmetric_kl(proposals)
    close = (dist + dist.T) * 0.5 < tau
    degree = close.sum(dim=1).tolist()
    peak_val, peak_pos = proposals.max(dim=1)
    energy = (proposals * proposals).sum(dim=1).tolist()
    order = sorted(range(len(proposals)),
                   key=lambda i: (-degree[i], int(peak_pos[i]), -float(peak_val[i]), -energy[i]))
    free = torch.ones(len(proposals), dtype=torch.bool, device=proposals.device)
    merged = []
    for i in order:
        if free[i]:
            members = close[i] & free
            free &= ~members
            merged.append(proposals[members].mean(dim=0))
    return torch.stack(merged)


def merge(proposals: torch.Tensor, tau: float, mode: str = "reference", eps: float = DEFAULT_EPS) -> torch.Tensor:
    """One merging iteration (iterations 1..N-1) in the given mode (eps: the reference's clamp, 0 = none)."""
    if mode == "leaders":
        return merge_leaders(proposals, tau)
    if mode == "components":
        return merge_components(proposals, tau)
    if mode == "reference":
        return merge_reference(proposals, tau, eps)
    raise DiffprobeError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")


def kmeans_refine(maps: torch.Tensor, centres: torch.Tensor, max_iter: int = 30) -> torch.Tensor:
    """Lloyd's k-means (Euclidean, as the reference's sklearn call) over the pixel maps (D, D),
    initialised at the proposals (k, D); stops when assignments no longer change. Clusters that
    empty are dropped. Returns the cluster means (k', D), k' <= k."""
    sq_maps = (maps * maps).sum(dim=1)
    assign = None
    for _ in range(max_iter):
        dist = sq_maps[:, None] - 2.0 * maps @ centres.T + (centres * centres).sum(dim=1)[None, :]
        new_assign = dist.argmin(dim=1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        used = torch.unique(assign)
        onehot = (assign[None, :] == used[:, None]).to(maps.dtype)
        centres = (onehot @ maps) / onehot.sum(dim=1, keepdim=True)
        assign = torch.searchsorted(used, assign)
    return centres
