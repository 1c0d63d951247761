"""Is a model's attention good enough for the heads? Two scores against the world's exact ground truth.

- own_object_ratio: DiffSeg-style self-attention grouping. For a query cell inside object o, the
  attention mass on o's key cells divided by the mass uniform attention would put there (|o| / K).
  1.0 = no grouping; K / |o| = all mass on the own object.
- peak_in_object: cross-attention localisation. The map of a word's token, upsampled bilinearly to the
  image, has its maximum inside the named object.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def grid_masks(instance: np.ndarray, ids: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """(n, h*w) bool: grid cells (row-major) covered at least half by each instance id of an (H, W) map."""
    h, w = grid
    H, W = instance.shape
    inst = torch.from_numpy(instance).long()
    onehot = torch.stack([(inst == i).float() for i in ids]) if ids else torch.zeros(0, H, W)
    frac = F.adaptive_avg_pool2d(onehot[:, None], (h, w))[:, 0] if ids else torch.zeros(0, h, w)
    return (frac >= 0.5).reshape(len(ids), h * w)


def own_object_ratios(probs: torch.Tensor, masks: torch.Tensor) -> list[float]:
    """Per object: mean over its query cells of (mass on own cells) / (|own cells| / K).

    probs (Q, K) self-attention of one image with Q = K cells; masks (n, K) bool. Objects with no cell
    at this resolution are skipped.
    """
    out = []
    k = probs.shape[-1]
    for m in masks:
        size = int(m.sum())
        if size == 0:
            continue
        mass = probs[m][:, m].sum(-1)  # (|o|,) mass each own query puts on own keys
        out.append(float(mass.mean()) / (size / k))
    return out


def peak_in_object(token_map: torch.Tensor, grid: tuple[int, int], mask: np.ndarray) -> bool:
    """token_map (Q,) over a row-major query grid; mask (H, W) bool of the object at image resolution."""
    up = F.interpolate(token_map.reshape(1, 1, *grid).float(), size=mask.shape, mode="bilinear",
                       align_corners=False)[0, 0]
    y, x = divmod(int(up.argmax()), mask.shape[1])
    return bool(mask[y, x])
