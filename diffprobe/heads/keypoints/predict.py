"""Keypoints of new images with test-time ensembling over random affine transforms (a head the runner drives).

For each image: n transforms T_i (training ranges, out-of-view pixels black, drawn from the prediction's seed, so an
image's keypoints do not depend on the pass it joins); the maps of every T_i(x) for the K keypoint tokens in one
batch; each upsampled bilinearly to the image side S and brought back by T_i^-1 with a ones-mask; ensemble =
sum(maps) / sum(masks) (0 where no transform saw the pixel). Points are the argmax pixel centres or a windowed
soft-argmax, confidence the ensemble's peak value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError
from diffprobe.heads.keypoints.affine import AffineRange, sample_affine, unwarp, warp_image
from diffprobe.heads.keypoints.image_sets import Frame, image_frame, prepare_image
from diffprobe.heads.keypoints.maps import MapSettings, maps_plan, token_maps
from diffprobe.heads.keypoints.state import KeypointModel
from diffprobe.heads.keypoints.targets import argmax_points, peak_values, soft_argmax_points
from diffprobe.hooks import Site
from diffprobe.runner import Head, Item, Plan, View

READOUTS = ("argmax", "soft_argmax")


@dataclass(frozen=True)
class PredictSettings:
    """augmentations: transforms per image (1 = just the image); batch_size: transformed images per denoiser
    call (the result is the same for any); readout: "argmax" | "soft_argmax" (window `soft_radius` px at image
    resolution)."""

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

    def transforms(self) -> tuple[torch.Tensor, torch.Generator]:
        """(thetas (n, 2, 3), the generator after drawing them: the latents and noise come from it next)."""
        generator = torch.Generator().manual_seed(self.seed)
        if self.augmentations == 1:
            return torch.eye(2, 3).unsqueeze(0), generator
        return sample_affine(self.augmentations, self.affine, generator=generator), generator


@dataclass
class Prediction:
    """points (K, 2) x, y in pixels of the S x S processed image; confidence (K,); maps (K, S, S); frame: from
    the processed image to the original (frame.to_original(points))."""

    points: torch.Tensor
    confidence: torch.Tensor
    maps: torch.Tensor
    frame: Frame | None = None

    def original_points(self) -> np.ndarray:
        return self.frame.to_original(self.points.numpy())


def ensemble(maps: torch.Tensor, thetas: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (n, K, r, r) of the n transformed views -> (K, H, W) = `size`: each upsampled bilinearly, brought back
    by its theta^-1 (n, 2, 3), summed and divided by how many views saw each pixel (0 where none did)."""
    maps = F.interpolate(maps.cpu(), size=size, mode="bilinear", align_corners=False)
    total = unwarp(maps, thetas).sum(0)
    seen = unwarp(torch.ones(len(thetas), 1, *size), thetas).sum(0)
    return torch.where(seen > 0, total / seen.clamp_min(1e-12), torch.zeros(()))


def read_points(maps: torch.Tensor, cfg: PredictSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(points (K, 2), confidence (K,)) from ensembled maps (K, S, S)."""
    pts = argmax_points(maps) if cfg.readout == "argmax" else soft_argmax_points(maps, cfg.soft_radius)
    return pts, peak_values(maps)


class KeypointPredictHead(Head):
    """The keypoints of an item's image: its `cfg.augmentations` transformed views with the model's embeddings as
    the context, their maps of the K chosen tokens ensembled; finish -> Prediction (with the image's Frame).

    The item is an Item whose image is a PIL image (data["box"]: an optional crop box) or a (1, 3, S, S) tensor.
    """

    name = "keypoints"

    def __init__(self, spec: MapSettings, model: KeypointModel, cfg: PredictSettings, image_size: int,
                 crop: str = "center", resize: str = "bilinear"):
        self.spec, self.model, self.cfg = spec, model, cfg
        self.size, self.crop, self.resize = int(image_size), crop, resize

    def plan(self, sites: Mapping[str, Site]) -> Plan:
        return maps_plan(self.spec, self.model.embeddings, self.size, batch=self.cfg.batch_size)

    def inputs(self, item: Item | torch.Tensor) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            image = item
        else:
            image, _ = prepare_image(item.image, item.data.get("box"), self.size, self.crop, self.resize)
        thetas, _ = self.cfg.transforms()
        return warp_image(image.expand(len(thetas), -1, -1, -1), thetas)

    def draws(self, x: torch.Tensor | None) -> torch.Generator:
        return self.cfg.transforms()[1]

    def finish(self, view: View, item: Item | torch.Tensor) -> Prediction:
        with torch.no_grad():
            maps = ensemble(token_maps(view, self.spec.sites, self.model.indices), self.cfg.transforms()[0],
                            (self.size, self.size))
        points, confidence = read_points(maps, self.cfg)
        frame = None if isinstance(item, torch.Tensor) else image_frame(item.image.size, item.data.get("box"),
                                                                         self.size, self.crop)[0]
        return Prediction(points, confidence, maps, frame)
