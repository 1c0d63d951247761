"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), as DiffCut applies it to any
segmentation: label masks are repeatedly averaged over each pixel's neighbours at several dilations,
weighted by how similar the neighbours' colours are (a softmax over neighbours of -|I_p - I_q| divided by
a tenth of the local colour spread), then the arg-max label is median-filtered (3 x 3).

Memory: one (8 * len(dilations), H, W) float32 affinity (32 x 512 x 512: 32 MiB) and one label mask's
shifts of the same size at a time; refine_labels holds at most PIXEL_BYTES a pixel (176 MiB at 512 x 512),
whatever the number of labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError

OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
DILATIONS = (1, 2, 4, 8)   # DiffCut's
ITERATIONS = 10            # DiffCut's
PIXEL_BYTES = 704          # refine_labels' peak per pixel, measured: one channel's neighbours, their spread and the
                           # running logits, then the (32, H, W) weights and one mask's shifts


def neighbours(x: torch.Tensor, dilations=DILATIONS) -> torch.Tensor:
    """(C, 8 * len(dilations), H, W): each pixel's 8 neighbours at each dilation (replicate padding)."""
    _, h, w = x.shape
    out = []
    for d in dilations:
        pad = F.pad(x[None], [d] * 4, mode="replicate")[0]
        out += [pad[:, d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w] for dy, dx in OFFSETS]
    return torch.stack(out, dim=1)


def affinity(image: torch.Tensor, dilations=DILATIONS) -> torch.Tensor:
    """(P, H, W) weights over each pixel's P neighbours (summing to 1) from an image (C, H, W): the softmax over
    neighbours of the channels' mean of -|I_p - I_q| / (1e-8 + 0.1 * spread), spread the standard deviation of
    the pixel (repeated once per dilation) and its neighbours; one channel at a time (P values per pixel held)."""
    total = None
    for channel in image[:, None]:                                            # (1, H, W)
        near = neighbours(channel, dilations)[0]                              # (P, H, W)
        centre = channel.expand(len(dilations), -1, -1)
        spread = torch.cat([centre, near]).std(dim=0, keepdim=True)           # (1, H, W)
        logits = (near - channel).abs_().div_(1e-8 + 0.1 * spread).neg_()
        total = logits if total is None else total.add_(logits)
    return torch.softmax(total / image.shape[0], dim=0)


def _refined(mask: torch.Tensor, aff: torch.Tensor, iterations: int, dilations) -> torch.Tensor:
    """(1, H, W): one mask (1, H, W) averaged `iterations` times over its neighbours weighted by aff (P, H, W)."""
    for _ in range(iterations):
        mask = (neighbours(mask, dilations)[0] * aff).sum(dim=0, keepdim=True)
    return mask


def _check_sizes(image: torch.Tensor, masks: torch.Tensor) -> None:
    if image.shape[1:] != masks.shape[-2:]:
        raise DiffprobeError(f"PAMR needs the image and the masks at one size, got {tuple(image.shape[1:])} "
                             f"and {tuple(masks.shape[-2:])}")


def pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int = ITERATIONS, dilations=DILATIONS) -> torch.Tensor:
    """Refined masks (K, H, W) from masks (K, H, W) and the image (C, H, W) at the same size."""
    _check_sizes(image, masks)
    aff = affinity(image.float(), dilations)
    return torch.cat([_refined(m[None].float(), aff, iterations, dilations) for m in masks])


def refine_labels(labels: torch.Tensor, image: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    """Labels (H, W) int64 refined by PAMR on their one-hot masks and the image (C, H, W), then a 3 x 3
    median filter; the values are the input's (a label may vanish). Each label's mask is refined in turn and
    the per-pixel arg-max kept as it goes (the first label wins ties), so memory does not grow with the labels:
    about PIXEL_BYTES per pixel at most."""
    from scipy.ndimage import median_filter

    _check_sizes(image, labels)
    used, inverse = torch.unique(labels, return_inverse=True)
    aff = affinity(image.float())
    best = best_index = None
    for k in range(len(used)):
        m = _refined((inverse == k).float()[None], aff, iterations, DILATIONS)[0]
        if best is None:
            best, best_index = m, torch.zeros(labels.shape, dtype=torch.long)
        else:
            better = m > best
            best = torch.where(better, m, best)
            best_index.masked_fill_(better, k)
    filtered = torch.from_numpy(median_filter(best_index.numpy(), size=3, mode="nearest")).long()
    return used[filtered]
