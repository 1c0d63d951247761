"""Which tokens are keypoints: KL candidate ranking, farthest point sampling, final choice by frequency.

maps are one image's cross-attention maps (N tokens, H, W) at map resolution.
"""

from __future__ import annotations

from collections import Counter

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.heads.keypoints.targets import argmax_points, gaussian_maps

TARGET_EPS = 1e-5  # added to every target pixel before normalising (the reference's find_top_k_gaussian)


def kl_to_gaussian(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """KL(target || softmax(map)) per token: (N, H, W) -> (N,).

    target: an isotropic Gaussian of std `sigma` px at the map's argmax, plus TARGET_EPS everywhere,
    normalised to sum 1; the map becomes a distribution by a softmax over its raw values (as the
    reference code does, not by dividing by its sum).
    """
    n, h, w = maps.shape
    target = gaussian_maps(argmax_points(maps), (h, w), sigma).flatten(1) + TARGET_EPS
    target = target / target.sum(dim=1, keepdim=True)
    log_q = torch.log_softmax(maps.flatten(1), dim=1)
    return (torch.special.xlogy(target, target) - target * log_q).sum(dim=1)


def rank_candidates(maps: torch.Tensor, num: int, sigma: float) -> torch.Tensor:
    """Indices (num,) of the tokens whose maps are closest (KL) to a single Gaussian, best first."""
    if not 1 <= num <= maps.shape[0]:
        raise DiffprobeError(f"cannot keep {num} candidate tokens out of {maps.shape[0]}")
    kl = kl_to_gaussian(maps.detach().float(), sigma)
    return torch.sort(kl, stable=True).indices[:num]


def farthest_point_sampling(points: torch.Tensor, k: int) -> torch.Tensor:
    """k indices into points (M, 2): the farthest pair first, then greedily the point farthest from the chosen.

    Ties go to the lowest index (first pair in (i, j) row-major order).
    """
    m = points.shape[0]
    if not 1 <= k <= m:
        raise DiffprobeError(f"farthest point sampling cannot choose {k} of {m} points")
    if m == 1:
        return torch.zeros(1, dtype=torch.long)
    d = torch.cdist(points.double(), points.double())
    flat = int(torch.argmax(d))
    chosen = [flat // m, flat % m][:k]
    nearest = torch.minimum(d[chosen[0]], d[chosen[-1]])
    while len(chosen) < k:
        nearest[chosen] = -1.0
        nxt = int(torch.argmax(nearest))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, d[nxt])
    return torch.tensor(chosen, dtype=torch.long)


def spread_tokens(maps: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Token ids (k,): farthest point sampling over the argmax locations of the candidates' maps."""
    pts = argmax_points(maps[candidates].detach())
    return candidates[farthest_point_sampling(pts, k)]


def most_frequent(chosen: list[torch.Tensor], k: int) -> torch.Tensor:
    """The k token ids chosen most often across images (k,), most frequent first, ties by lower id."""
    counts = Counter(int(t) for c in chosen for t in c)
    if len(counts) < k:
        raise DiffprobeError(f"only {len(counts)} distinct tokens were ever chosen, fewer than top_k={k}")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return torch.tensor([tok for tok, _ in ranked[:k]], dtype=torch.long)
