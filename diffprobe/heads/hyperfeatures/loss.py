"""CLIP-style symmetric correspondence loss on descriptor maps (Diffusion Hyperfeatures, ref)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError


def to_grid(points: torch.Tensor, image_hw: tuple[int, int], grid: int) -> torch.Tensor:
    """(N, 2) (x, y) pixels of an image of size (H, W) -> (N, 2) long cells of a grid x grid map, as the
    reference (rescale_points, then points_to_idxs): round(clip(p * grid / W, 0, grid - 1)), rounding
    halves to even as np.round does."""
    h, w = image_hw
    scale = torch.tensor([grid / w, grid / h], dtype=torch.float64)
    return torch.round((torch.as_tensor(points).double() * scale).clamp(0, grid - 1)).long()


def correspondence_loss(
    desc_a: torch.Tensor, desc_b: torch.Tensor, cells_a: torch.Tensor, cells_b: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Symmetric cross-entropy of cosine similarities / temperature.

    desc_a, desc_b: (D, H, W) descriptor maps; cells_a, cells_b: (N, 2) long (x, y) cells of
    corresponding points. Each point of a scores all H*W cells of b (the right one is its partner),
    and the reverse; the two cross-entropies are averaged. Returns a scalar.
    """
    if desc_a.shape != desc_b.shape or desc_a.dim() != 3:
        raise DiffprobeError(f"descriptor maps must both be (D, H, W); got {tuple(desc_a.shape)} and {tuple(desc_b.shape)}")
    if cells_a.shape != cells_b.shape or cells_a.shape[0] == 0:
        raise DiffprobeError("correspondence loss needs the same non-zero number of points in both images")
    w = desc_a.shape[2]
    cells_a, cells_b = cells_a.to(desc_a.device), cells_b.to(desc_a.device)
    a = F.normalize(desc_a.flatten(1), dim=0)  # (D, HW)
    b = F.normalize(desc_b.flatten(1), dim=0)
    ia = cells_a[:, 1] * w + cells_a[:, 0]
    ib = cells_b[:, 1] * w + cells_b[:, 0]
    logits_ab = a[:, ia].T @ b / temperature  # (N, HW)
    logits_ba = b[:, ib].T @ a / temperature
    return 0.5 * (F.cross_entropy(logits_ab, ib) + F.cross_entropy(logits_ba, ia))
