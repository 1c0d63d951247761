"""DIFT (Tang et al., NeurIPS 2023) on a UNet and DiTF (Gan et al., NeurIPS 2025) on a diffusion transformer: a real
image's features from one noisy denoiser call, averaged over an ensemble of noise draws; points are matched by cosine
nearest neighbour after bilinear upsampling to each image's size (diffprobe.heads.hyperfeatures.matching.DescriptorField
does that part).

DIFT (Tsingularity/dift, `src/models/dift_sd.py`, `eval_spair.py`): SD 2.1 at 768 px, the image resized with PIL
bicubic, aspect ignored; E = 8 copies, each with its own VAE posterior sample and its own noise; DDPM add_noise at
t = 261 (z_t = 0.80973 z + 0.58680 e on SD 2.1's schedule); the prompt "a photo of a {category}" when the category is
known, else ""; one call; the output of `up_blocks[1]` (after its upsampler: 1/16 of the image on SD 2.1); the mean
over the copies. diffprobe runs the whole call (the reference stops after the block: the same features, more time).

DiTF (ganchaofan0000/DiTF, `src/flux/feat_flux.py`, `eval_spair.py`; FLUX only there): the residual stream entering a
middle block (FLUX's global block 28 of 57, noise at t = 0.26), mean over the E copies, its "massive activation"
channels set to zero (FLUX-dev's 154 and 1446; here found per image as the channels whose median |x| over the image
tokens exceeds 100 x the median channel's), then that block's own AdaLN: LayerNorm over the channels (no affine, eps
1e-6), times (1 + scale), plus shift (the block's modulation, `hook_modulation`, averaged over the copies). The
stream entering block k is block k - 1's image-token output (`hook_out`), so k >= 1. Any transformer family with
modulation sites (PixArt and diffprobe-mini-dit, SD3, FLUX, AuraFlow) runs it; the image is the model's square (the
reference: long side 640, aspect kept) and the prompt is given (the reference: an MLLM caption per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from einops import rearrange
import torch
import torch.nn.functional as F

from diffprobe.data.images import image_to_tensor, load_image
from diffprobe.drives import Drive
from diffprobe.errors import DiffprobeError
from diffprobe.heads.hyperfeatures.extract import image_generator
from diffprobe.heads.hyperfeatures.model import cached
from diffprobe.hooks import Need, Reduce, Site
from diffprobe.runner import Head, Item, Plan, View, run_heads


@dataclass(frozen=True)
class DiftSettings:
    """block: on a UNet the decoder block whose output is read (None: DIFT's up_blocks.1); on a transformer the block
    whose input and AdaLN make DiTF's features, in execution order (None: the middle one, as DiTF's 28 of FLUX's 57);
    timestep (None: DIFT's 261 on a UNet, DiTF's 260 on a transformer); ensemble: noise draws averaged (ref 8);
    image_size: side the image is resized to (None: the model's); prompt: the text condition (DIFT's "a photo of a
    {category}", or ""); discard (DiTF): "auto" (massive channels found per image), "none", or channel indices
    "154,1446"."""

    block: int | None = None
    timestep: int | None = None
    ensemble: int = 8
    image_size: int | None = None
    prompt: str = ""
    discard: str = "auto"

    def __post_init__(self):
        if self.ensemble < 1 or (self.block is not None and self.block < 0):
            raise DiffprobeError(f"DIFT needs ensemble >= 1 and a block index >= 0, got {self.ensemble} and {self.block}")
        if self.discard not in ("auto", "none") and not all(c.strip().isdigit() for c in self.discard.split(",")):
            raise DiffprobeError(f"discard must be auto, none or channel indices such as 154,1446; got {self.discard!r}")


def is_unet(sites: Mapping[str, Site]) -> bool:
    return any(n.startswith("up_blocks.") for n in sites)


def default_timestep(sites: Mapping[str, Site]) -> int:
    """DIFT's t on a UNet, DiTF's on a transformer."""
    return 261 if is_unet(sites) else 260


def massive_channels(x: torch.Tensor, ratio: float = 100.0) -> list[int]:
    """Channels of x (C, h, w) whose median |x| over the positions exceeds `ratio` x the median channel's."""
    med = rearrange(x.abs(), "c h w -> c (h w)").median(1).values      # (C,)
    return (med > ratio * med.median()).nonzero().flatten().tolist()


def adaln_features(x: torch.Tensor, modulation: torch.Tensor, discard: str = "auto") -> torch.Tensor:
    """DiTF's features (C, h, w) of the block input x (C, h, w) and its AdaLN modulation (k * C,) (shift, scale
    first, diffusers' chunk order): discarded channels zeroed, LayerNorm over the channels, (1 + scale), + shift."""
    c = x.shape[0]
    channels = (massive_channels(x) if discard == "auto" else [] if discard == "none"
                else [int(i) for i in discard.split(",")])
    x = x.clone()
    x[channels] = 0
    shift, scale = modulation[:c], modulation[c:2 * c]
    tokens = F.layer_norm(rearrange(x, "c h w -> h w c"), (c,), eps=1e-6) * (1 + scale) + shift
    return rearrange(tokens, "h w c -> c h w")


class DiftHead(Head):
    """One noisy call on `ensemble` copies of the image; finish -> (C, h, w), the UNet block's output (DIFT) or the
    transformer block's AdaLN-normalised input (DiTF) averaged over them. Its noise and posterior samples are drawn
    from (seed, the image's pixels), so an image's features do not depend on the pass or the order it comes in."""

    name = "dift"

    def __init__(self, settings: DiftSettings, image_size: int, seed: int = 0):
        self.settings, self.size, self.seed = settings, int(image_size), int(seed)

    def sites_of(self, sites: Mapping[str, Site]) -> tuple[str, ...]:
        """(up_blocks.b.hook_out,) on a UNet; (block k - 1's hook_out, block k's hook_modulation) on a transformer."""
        block = self.settings.block
        if is_unet(sites):
            name = f"up_blocks.{1 if block is None else block}.hook_out"
            if name not in sites:
                raise DiffprobeError(f"DIFT reads a UNet decoder block's output; this model has no {name}")
            return (name,)
        blocks = sorted((s for s in sites.values() if s.kind == "block"), key=lambda s: s.order)
        k = len(blocks) // 2 if block is None else block
        if not 1 <= k < len(blocks):
            raise DiffprobeError(f"DiTF reads the input of a transformer block 1..{len(blocks) - 1} (the output of the "
                                 f"one before it), got block {k}")
        modulation = f"{blocks[k].module}.hook_modulation"
        if modulation not in sites:
            raise DiffprobeError(f"DiTF needs the AdaLN modulation of {blocks[k].module}; this model has none there")
        return blocks[k - 1].name, modulation

    def plan(self, sites: Mapping[str, Site]) -> Plan:
        t = self.settings.timestep if self.settings.timestep is not None else default_timestep(sites)
        drive = Drive("one_step", timestep=t, noise=True, sample_latent=True)
        return Plan(drive, (Need(self.sites_of(sites), Reduce()),), prompt=self.settings.prompt)

    def inputs(self, item: Item) -> torch.Tensor:
        x = image_to_tensor(item.image, size=self.size, crop="none", resize="bicubic")
        return x.expand(self.settings.ensemble, -1, -1, -1)

    def draws(self, x: torch.Tensor | None) -> torch.Generator:
        return image_generator(self.seed, x[:1])

    def finish(self, view: View, item: Item) -> torch.Tensor:
        """The view holds this plan's sites only: the block output, and on a transformer the modulation."""
        (block,) = (n for n, s in view.sites.items() if s.kind == "block")
        modulation = [n for n, s in view.sites.items() if s.kind == "modulation"]
        x = view[block].float().mean(0)
        return adaln_features(x, view[modulation[0]].float().mean(0), self.settings.discard) if modulation else x


def dift_describer(bb, settings: DiftSettings, seed: int = 0):
    """path -> ((C, h, w) DIFT features, the image's (H, W)), for evaluate_pairs and task=correspond."""
    head = DiftHead(settings, bb.check_image_size(settings.image_size), seed)

    def describe(path: Path):
        image = load_image(path)
        with torch.no_grad():
            (features,) = run_heads(bb, [head], Item(str(path), image))
        return features, (image.height, image.width)

    return cached(describe)
