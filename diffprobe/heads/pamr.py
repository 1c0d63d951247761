"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), as DiffCut applies it to any
segmentation: label masks are repeatedly averaged over each pixel's neighbours at several dilations,
weighted by how similar the neighbours' colours are (a softmax over neighbours of -|I_p - I_q| divided by
a tenth of the local colour spread), then the arg-max label is median-filtered (3 x 3).

Memory: one (8 * len(dilations), H, W) float32 affinity (32 x 512 x 512: 32 MiB) and one label mask's
shifts of the same size at a time.
"""

from __future__ import annotations

from einops import rearrange
import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError

OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
DILATIONS = (1, 2, 4, 8)   # DiffCut's
ITERATIONS = 10            # DiffCut's


def neighbours(x: torch.Tensor, dilations=DILATIONS) -> torch.Tensor:
    """(C, 8 * len(dilations), H, W): each pixel's 8 neighbours at each dilation (replicate padding)."""
    _, h, w = x.shape
    out = []
    for d in dilations:
        pad = F.pad(x[None], [d] * 4, mode="replicate")[0]
        out += [pad[:, d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w] for dy, dx in OFFSETS]
    return torch.stack(out, dim=1)


def affinity(image: torch.Tensor, dilations=DILATIONS) -> torch.Tensor:
    """(P, H, W) weights over each pixel's P neighbours (summing to 1) from an image (C, H, W)."""
    near = neighbours(image, dilations)                                       # (C, P, H, W)
    centre = image[:, None].expand(-1, len(dilations), -1, -1)
    spread = torch.cat([centre, near], dim=1).std(dim=1, keepdim=True)          # (C, 1, H, W)
    logits = -(near - image[:, None]).abs() / (1e-8 + 0.1 * spread)
    return torch.softmax(logits.mean(dim=0), dim=0)


def pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int = ITERATIONS, dilations=DILATIONS) -> torch.Tensor:
    """Refined masks (K, H, W) from masks (K, H, W) and the image (C, H, W) at the same size."""
    if image.shape[1:] != masks.shape[1:]:
        raise DiffprobeError(f"PAMR needs the image and the masks at one size, got {tuple(image.shape[1:])} "
                             f"and {tuple(masks.shape[1:])}")
    aff = affinity(image.float(), dilations)
    out = masks.float().clone()
    for k in range(out.shape[0]):
        m = out[k:k + 1]
        for _ in range(iterations):
            m = (neighbours(m, dilations)[0] * aff).sum(dim=0, keepdim=True)
        out[k] = m[0]
    return out


def refine_labels(labels: torch.Tensor, image: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    """Labels (H, W) int64 refined by PAMR on their one-hot masks and the image (C, H, W), then a 3 x 3
    median filter; the values are the input's (a label may vanish)."""
    from scipy.ndimage import median_filter

    used, inverse = torch.unique(labels, return_inverse=True)
    masks = rearrange(F.one_hot(inverse, len(used)), "h w k -> k h w").float()
    refined = pamr(image, masks, iterations).argmax(dim=0)
    filtered = torch.from_numpy(median_filter(refined.numpy(), size=3, mode="nearest")).long()
    return used[filtered]
