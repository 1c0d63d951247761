"""Keypoints of new images with test-time ensembling over random affine transforms.

For each image: n transforms T_i (training ranges, out-of-view pixels black); the maps of T_i(x) for the K keypoint tokens, in
batched UNet calls; each upsampled bilinearly to the image side S and brought back by T_i^-1 with a
ones-mask; ensemble = sum(maps) / sum(masks) (0 where no transform saw the pixel). Points are the
argmax pixel centres or a windowed soft-argmax, confidence the ensemble's peak value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError
from diffprobe.heads.keypoints.affine import AffineRange, sample_affine, unwarp, warp_image
from diffprobe.heads.keypoints.maps import MapSpec, attention_maps
from diffprobe.heads.keypoints.state import KeypointModel
from diffprobe.heads.keypoints.targets import argmax_points, peak_values, soft_argmax_points

READOUTS = ("argmax", "soft_argmax")


@dataclass(frozen=True)
class PredictConfig:
    """augmentations: transforms per image (1 = just the image); batch_size: transformed images per UNet
    call; readout: "argmax" | "soft_argmax" (window `soft_radius` px at image resolution)."""

    augmentations: int = 10
    affine: AffineRange = field(default_factory=AffineRange)
    batch_size: int = 10
    readout: str = "argmax"
    soft_radius: float = 6.0
    seed: int = 0

    def __post_init__(self):
        if self.augmentations < 1 or self.batch_size < 1:
            raise DiffprobeError("keypoints augmentations and predict batch_size must be at least 1")
        if self.readout not in READOUTS:
            raise DiffprobeError(f"keypoints readout must be one of {READOUTS}, got {self.readout!r}")


@dataclass
class Prediction:
    """points (K, 2) x, y in pixels of the S x S processed image; confidence (K,); maps (K, S, S)."""

    points: torch.Tensor
    confidence: torch.Tensor
    maps: torch.Tensor


@torch.no_grad()
def ensemble_maps(bb, spec: MapSpec, model: KeypointModel, image: torch.Tensor, cfg: PredictConfig,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Ensembled maps (K, S, S) of the keypoint tokens for one image (1, 3, S, S)."""
    size = image.shape[-2:]
    if cfg.augmentations == 1:
        thetas = torch.eye(2, 3).unsqueeze(0)
    else:
        thetas = sample_affine(cfg.augmentations, cfg.affine, generator=generator)
    k = model.num_keypoints
    total = torch.zeros(k, *size)
    seen = torch.zeros(1, *size)
    for start in range(0, len(thetas), cfg.batch_size):
        theta = thetas[start : start + cfg.batch_size]
        views = warp_image(image.expand(len(theta), -1, -1, -1), theta)
        maps = attention_maps(bb, spec, views, model.embeddings, generator=generator, tokens=model.indices)
        maps = F.interpolate(maps.cpu(), size=size, mode="bilinear", align_corners=False)
        total += unwarp(maps, theta).sum(0)
        seen += unwarp(torch.ones(len(theta), 1, *size), theta).sum(0)
    return torch.where(seen > 0, total / seen.clamp_min(1e-12), torch.zeros(()))


def read_points(maps: torch.Tensor, cfg: PredictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(points (K, 2), confidence (K,)) from ensembled maps (K, S, S)."""
    pts = argmax_points(maps) if cfg.readout == "argmax" else soft_argmax_points(maps, cfg.soft_radius)
    return pts, peak_values(maps)


def predict_image(bb, spec: MapSpec, model: KeypointModel, image: torch.Tensor, cfg: PredictConfig) -> Prediction:
    """Keypoints of one image (1, 3, S, S) in [-1, 1]."""
    gen = torch.Generator().manual_seed(cfg.seed)
    maps = ensemble_maps(bb, spec, model, image, cfg, gen)
    points, confidence = read_points(maps, cfg)
    return Prediction(points, confidence, maps)
