"""DIFT (Tang et al., NeurIPS 2023): a real image's features from one noisy denoiser call, one decoder block's output
averaged over an ensemble of noise draws; points are matched by cosine nearest neighbour after bilinear upsampling
to each image's size (diffprobe.heads.hyperfeatures.matching.DescriptorField does that part).

Reference (Tsingularity/dift, `src/models/dift_sd.py`, `eval_spair.py`): SD 2.1 at 768 px, the image resized with
PIL bicubic, aspect ignored; E = 8 copies, each with its own VAE posterior sample and its own noise; DDPM add_noise
at t = 261 (z_t = 0.80973 z + 0.58680 e on SD 2.1's schedule); the prompt "a photo of a {category}" when the
category is known, else ""; one call; the output of `up_blocks[1]` (after its upsampler: 1/16 of the image on
SD 2.1); the mean over the copies. diffprobe runs the whole call (the reference stops after the block: the same
features, more time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from diffprobe.data.images import image_to_tensor, load_image
from diffprobe.drives import Drive
from diffprobe.errors import DiffprobeError
from diffprobe.heads.hyperfeatures.extract import image_generator
from diffprobe.heads.hyperfeatures.model import cached
from diffprobe.hooks import Need, Reduce, Site
from diffprobe.runner import Head, Item, Plan, View, run_heads


@dataclass(frozen=True)
class DiftSettings:
    """block: index of the UNet decoder block whose output is read (ref up_ft_index 1); timestep (ref 261);
    ensemble: noise draws averaged (ref 8); image_size: side the image is resized to (None: the model's, 768 for
    SD 2.1); prompt: the text condition (ref "a photo of a {category}", or "")."""

    block: int = 1
    timestep: int = 261
    ensemble: int = 8
    image_size: int | None = None
    prompt: str = ""

    def __post_init__(self):
        if self.ensemble < 1 or self.block < 0:
            raise DiffprobeError(f"DIFT needs ensemble >= 1 and a block index >= 0, got {self.ensemble} and {self.block}")


class DiftHead(Head):
    """One noisy call on `ensemble` copies of the image; finish -> (C, h, w), the block's output averaged over
    them. Its noise and posterior samples are drawn from (seed, the image's pixels), so an image's features do
    not depend on the pass or the order it comes in."""

    name = "dift"

    def __init__(self, settings: DiftSettings, image_size: int, seed: int = 0):
        self.settings, self.size, self.seed = settings, int(image_size), int(seed)

    def site(self, sites: Mapping[str, Site]) -> str:
        name = f"up_blocks.{self.settings.block}.hook_out"
        if name not in sites:
            raise DiffprobeError(f"DIFT reads a UNet decoder block's output; this model has no {name} "
                                 "(a transformer has no decoder blocks)")
        return name

    def plan(self, sites: Mapping[str, Site]) -> Plan:
        drive = Drive("one_step", timestep=self.settings.timestep, noise=True, sample_latent=True)
        return Plan(drive, (Need((self.site(sites),), Reduce()),), prompt=self.settings.prompt)

    def inputs(self, item: Item) -> torch.Tensor:
        x = image_to_tensor(item.image, size=self.size, crop="none", resize="bicubic")
        return x.expand(self.settings.ensemble, -1, -1, -1)

    def draws(self, x: torch.Tensor | None) -> torch.Generator:
        return image_generator(self.seed, x[:1])

    def finish(self, view: View, item: Item) -> torch.Tensor:
        return view[self.site(view.sites)].float().mean(0)


def dift_describer(bb, settings: DiftSettings, seed: int = 0):
    """path -> ((C, h, w) DIFT features, the image's (H, W)), for evaluate_pairs and task=correspond."""
    head = DiftHead(settings, bb.check_image_size(settings.image_size), seed)

    def describe(path: Path):
        image = load_image(path)
        with torch.no_grad():
            (features,) = run_heads(bb, [head], Item(str(path), image))
        return features, (image.height, image.width)

    return cached(describe)
