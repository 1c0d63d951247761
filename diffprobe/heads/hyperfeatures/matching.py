"""Point matching between two descriptor maps: nearest neighbour by cosine, mutual NN, soft-argmax.

Descriptor maps (D, h, w) are compared as if bilinearly upsampled to the image size (H, W) (ref:
"after upsampling both maps to the load size"); the upsampled map is formed a few rows at a time
with grid_sample, so a 512 x 512 x 384 map is never held whole. Points are (x, y) pixels of the
image the map belongs to, pixel centres at integer coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError

METHODS = ("nn", "mutual", "soft_argmax")


def _norm_coords(pix: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel coordinates -> grid_sample coordinates (align_corners=False, as F.interpolate bilinear)."""
    return (2 * pix + 1) / size - 1


class DescriptorField:
    """A (D, h, w) descriptor map seen at image size (H, W)."""

    def __init__(self, desc: torch.Tensor, image_hw: tuple[int, int], rows_per_chunk: int = 64):
        if desc.dim() != 3:
            raise DiffprobeError(f"a descriptor map is (D, h, w), got {tuple(desc.shape)}")
        self.desc = desc.detach().float().cpu()[None]  # matching runs on the CPU: N x H x W x D is small
        self.h, self.w = int(image_hw[0]), int(image_hw[1])
        self.rows = rows_per_chunk

    def sample(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 2) pixel points, rounded and clipped -> (N, D) unit descriptors."""
        p = points.float().round()
        p = torch.stack([p[:, 0].clamp(0, self.w - 1), p[:, 1].clamp(0, self.h - 1)], 1)
        grid = torch.stack([_norm_coords(p[:, 0], self.w), _norm_coords(p[:, 1], self.h)], 1)
        v = F.grid_sample(self.desc, grid[None, None], mode="bilinear", align_corners=False)[0, :, 0]  # (D, N)
        return F.normalize(v.T, dim=1)

    def _rows(self, y0: int, y1: int) -> torch.Tensor:
        """Unit descriptors of image rows y0..y1-1: (D, (y1-y0) * W)."""
        ys = _norm_coords(torch.arange(y0, y1, dtype=torch.float32), self.h)
        xs = _norm_coords(torch.arange(self.w, dtype=torch.float32), self.w)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx, gy], -1)[None]
        v = F.grid_sample(self.desc, grid, mode="bilinear", align_corners=False)[0]
        return F.normalize(v.flatten(1), dim=0)

    def argmax(self, vecs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best pixel for each of (N, D) unit vectors: ((N, 2) float (x, y), (N,) cosine)."""
        best = torch.full((vecs.shape[0],), -2.0)
        idx = torch.zeros(vecs.shape[0], dtype=torch.long)
        for y0 in range(0, self.h, self.rows):
            y1 = min(self.h, y0 + self.rows)
            s, i = (vecs @ self._rows(y0, y1)).max(1)
            upd = s > best
            best[upd], idx[upd] = s[upd], i[upd] + y0 * self.w
        return torch.stack([idx % self.w, idx // self.w], 1).float(), best

    def soft_argmax(self, vecs: torch.Tensor, centres: torch.Tensor, radius: int, temperature: float) -> torch.Tensor:
        """Expected (x, y) under softmax(cosine / temperature) in a (2r+1)^2 pixel window round each centre."""
        out = torch.empty_like(centres)
        for n, (cx, cy) in enumerate(centres.long().tolist()):
            y0, y1 = max(0, cy - radius), min(self.h, cy + radius + 1)
            x0, x1 = max(0, cx - radius), min(self.w, cx + radius + 1)
            sims = (vecs[n] @ self._rows(y0, y1)).view(y1 - y0, self.w)[:, x0:x1]
            p = torch.softmax(sims.flatten() / temperature, 0).view_as(sims)
            ys, xs = torch.arange(y0, y1, dtype=torch.float32), torch.arange(x0, x1, dtype=torch.float32)
            out[n] = torch.stack([(p.sum(0) * xs).sum(), (p.sum(1) * ys).sum()])
        return out


@dataclass
class Matches:
    """source, target: (N, 2) (x, y) pixels; score: (N,) cosine; mutual: (N,) bool (cycle returns
    within `mutual_radius` of the source point; all True unless method "mutual")."""

    source: torch.Tensor
    target: torch.Tensor
    score: torch.Tensor
    mutual: torch.Tensor

    def to_dict(self) -> dict:
        return {
            "source": self.source.tolist(), "target": self.target.tolist(),
            "score": self.score.tolist(), "mutual": self.mutual.tolist(),
        }


def match_points(
    src: DescriptorField,
    tgt: DescriptorField,
    points: torch.Tensor,
    method: str = "nn",
    mutual_radius: float | None = None,
    soft_radius: int | None = None,
    soft_temperature: float = 0.02,
) -> Matches:
    """Match (N, 2) source pixels into the target.

    nn: best cosine over all target pixels. mutual: also match the found target point back into the
    source and flag points whose cycle lands within mutual_radius pixels (default: one descriptor
    cell) of where they started. soft_argmax: refine the NN by the expected position under
    softmax(cosine / soft_temperature) in a window of soft_radius pixels (default: one cell).
    """
    if method not in METHODS:
        raise DiffprobeError(f"matching method must be one of {METHODS}, got {method!r}")
    if points.dim() != 2 or points.shape[1] != 2:
        raise DiffprobeError(f"points must be (N, 2) (x, y) pixels, got {tuple(points.shape)}")
    vecs = src.sample(points)
    target, score = tgt.argmax(vecs)
    cell = max(tgt.h / tgt.desc.shape[2], tgt.w / tgt.desc.shape[3])
    if method == "soft_argmax":
        radius = soft_radius if soft_radius is not None else max(1, round(cell))
        target = tgt.soft_argmax(vecs, target, radius, soft_temperature)
    mutual = torch.ones(points.shape[0], dtype=torch.bool)
    if method == "mutual":
        back, _ = src.argmax(tgt.sample(target))
        src_cell = max(src.h / src.desc.shape[2], src.w / src.desc.shape[3])
        radius = mutual_radius if mutual_radius is not None else src_cell
        mutual = torch.linalg.norm(back - points.float().round(), dim=1) <= radius
    return Matches(source=points.float(), target=target, score=score, mutual=mutual)


def salient_grid(desc: torch.Tensor, image_hw: tuple[int, int], per_side: int = 8) -> torch.Tensor:
    """Source points when none are given: a per_side x per_side grid over the image, kept where the
    descriptor differs from the image border's mean descriptor more than average (the object is rarely
    on the border). desc: (D, h, w); returns (N, 2) (x, y) pixels of an (H, W) image, N >= 1."""
    desc = desc.detach().float().cpu()
    d = F.normalize(desc, dim=0)
    border = torch.cat([d[:, 0], d[:, -1], d[:, :, 0], d[:, :, -1]], dim=1).mean(1)
    saliency = 1 - torch.einsum("dhw,d->hw", d, F.normalize(border, dim=0))
    mask = saliency > saliency.mean()
    h, w = image_hw
    ys = (torch.arange(per_side) + 0.5) * h / per_side - 0.5
    xs = (torch.arange(per_side) + 0.5) * w / per_side - 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    cy = (pts[:, 1] * desc.shape[1] / h).long().clamp(0, desc.shape[1] - 1)
    cx = (pts[:, 0] * desc.shape[2] / w).long().clamp(0, desc.shape[2] - 1)
    keep = mask[cy, cx]
    return pts[keep] if keep.any() else pts
