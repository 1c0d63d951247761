"""The reference algorithm written literally: float64, the (S, S, S, S) aggregated tensor, KL by
broadcasting, the greedy merge. Slow and memory-hungry on purpose: the baseline of
benchmarks/diffseg_speed.py and the parity check of the fast head's `merge="reference"` mode.

fp16=True follows the reference's numerics: iteration 0 on anchors and maps cast to float16 with no
epsilon (zeros give NaN distances, never close), later iterations in float64 with no epsilon, and
groups only where an anchor is close to something (`if kl_bin.sum() > 0`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffprobe.heads.diffseg.merge import anchor_indices

EPS = 1e-12


def broadcast_kl(x: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Symmetric KL of maps (..., S, S) against maps broadcast with them, summed over the last two axes."""
    quotient = x.clamp_min(eps).log() - y.clamp_min(eps).log()
    return (x * quotient).sum((-2, -1)) / 2 - (y * quotient).sum((-2, -1)) / 2


def straightforward(maps_by_grid: dict, side: int, tau: float, points: int, chunk: int, out_px: int,
                    iterations: int = 3, fp16: bool = False) -> torch.Tensor:
    """Label map (out_px, out_px) from {(s, s): (L, s*s, s*s)} square grids, finest side `side`;
    anchors broadcast `chunk` at a time (the reference: 16)."""
    grids = sorted(maps_by_grid, key=lambda g: -g[0])
    sizes = torch.tensor([float(g[0]) for g in grids], dtype=torch.float64)
    ratio = sizes / sizes.sum()
    agg = torch.zeros(side, side, side, side, dtype=torch.float64)
    for r, grid in zip(ratio, grids):
        s = grid[0]
        w = maps_by_grid[grid].double().mean(0).reshape(-1, 1, s, s)
        w = F.interpolate(w, size=(side, side), mode="bilinear", align_corners=False).reshape(s, s, side, side)
        w = w / w.sum((2, 3), keepdim=True)
        w = w.repeat_interleave(side // s, 0).repeat_interleave(side // s, 1)
        agg += w * r
    anchors = agg.reshape(-1, side, side)[anchor_indices((side, side), points)][:, None]  # (M^2, 1, S, S)
    everything = agg.reshape(1, -1, side, side)
    eps = 0.0 if fp16 else EPS
    if fp16:
        anchors, everything = anchors.half(), everything.half()
    close = torch.cat([broadcast_kl(anchors[i:i + chunk], everything, eps) < tau
                       for i in range(0, len(anchors), chunk)])
    close = close.double()
    props = ((close @ agg.reshape(side * side, -1)) / close.sum(1, keepdim=True)).reshape(-1, side, side)
    for _ in range(iterations - 1):
        matched, merged = set(), []
        for i in range(len(props)):
            if i in matched:
                continue
            matched.add(i)
            sel = broadcast_kl(props[i], props, eps) < tau
            matched.update(torch.nonzero(sel).flatten().tolist())
            if sel.any():
                merged.append(props[sel].mean(0))
        props = torch.stack(merged)
    up = F.interpolate(props[:, None], size=(out_px, out_px), mode="bilinear", align_corners=False)
    return up[:, 0].argmax(0)
