"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), as DiffCut applies it to any
segmentation: label masks are repeatedly averaged over each pixel's neighbours at several dilations,
weighted by how similar the neighbours' colours are (a softmax over neighbours of -|I_p - I_q| divided by
a tenth of the local colour spread), then the arg-max label is median-filtered (3 x 3).

Memory: one (8 * len(dilations), H, W) float32 affinity (32 x 512 x 512: 32 MiB) and the shifts of a chunk of
label masks at a time: up to MAX_CHUNK on small images, where the many small operations cost more than their
memory, one from about 180 x 180 px on; refine_bytes (176 MiB at 512 x 512, 8 MB at 64 x 64), whatever the number
of labels.
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
LABEL_PIXEL_BYTES = 2 * 4 * len(OFFSETS) * len(DILATIONS)   # one more mask in a chunk: its shifts, weighted (float32)
CHUNK_BYTES = 8 * 2**20    # masks beyond the first refined together hold at most this ...
MAX_CHUNK = 6              # ... and are at most this many (small images: 64 px masks 6 at a time)


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


def _refined(masks: torch.Tensor, aff: torch.Tensor, iterations: int, dilations) -> torch.Tensor:
    """(K, H, W): masks (K, H, W) each averaged `iterations` times over its neighbours weighted by aff (P, H, W)."""
    for _ in range(iterations):
        masks = (neighbours(masks, dilations) * aff).sum(dim=1)
    return masks


def chunk_size(h: int, w: int) -> int:
    """Masks refined together at h x w: as many as CHUNK_BYTES holds, at least one and at most MAX_CHUNK."""
    return max(1, min(MAX_CHUNK, CHUNK_BYTES // (LABEL_PIXEL_BYTES * h * w)))


def refine_bytes(h: int, w: int) -> int:
    """refine_labels' peak at h x w: PIXEL_BYTES a pixel for the first mask of a chunk, and the others' shifts."""
    return (PIXEL_BYTES + (chunk_size(h, w) - 1) * LABEL_PIXEL_BYTES) * h * w


def _check_sizes(image: torch.Tensor, masks: torch.Tensor) -> None:
    if image.shape[1:] != masks.shape[-2:]:
        raise DiffprobeError(f"PAMR needs the image and the masks at one size, got {tuple(image.shape[1:])} "
                             f"and {tuple(masks.shape[-2:])}")


def pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int = ITERATIONS, dilations=DILATIONS) -> torch.Tensor:
    """Refined masks (K, H, W) from masks (K, H, W) and the image (C, H, W) at the same size."""
    _check_sizes(image, masks)
    aff = affinity(image.float(), dilations)
    n = chunk_size(*masks.shape[-2:])
    return torch.cat([_refined(masks[i:i + n].float(), aff, iterations, dilations) for i in range(0, len(masks), n)])


def refine_labels(labels: torch.Tensor, image: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    """Labels (H, W) int64 refined by PAMR on their one-hot masks and the image (C, H, W), then a 3 x 3
    median filter; the values are the input's (a label may vanish). The labels' masks are refined a chunk at a
    time and the per-pixel arg-max kept as it goes (the first label wins ties), so memory does not grow with the
    labels: refine_bytes at most."""
    from scipy.ndimage import median_filter

    _check_sizes(image, labels)
    used, inverse = torch.unique(labels, return_inverse=True)
    aff = affinity(image.float())
    best = best_index = None
    n = chunk_size(*labels.shape)
    chunks = (_refined((inverse[None] == torch.arange(i, min(i + n, len(used)))[:, None, None]).float(), aff,
                       iterations, DILATIONS) for i in range(0, len(used), n))
    for k, m in enumerate(m for chunk in chunks for m in chunk):
        if best is None:
            best, best_index = m, torch.zeros(labels.shape, dtype=torch.long)
        else:
            better = m > best
            best = torch.where(better, m, best)
            best_index.masked_fill_(better, k)
    filtered = torch.from_numpy(median_filter(best_index.numpy(), size=3, mode="nearest")).long()
    return used[filtered]
