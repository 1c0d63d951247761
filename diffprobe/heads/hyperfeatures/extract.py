"""Feature extraction for hyperfeatures: ResNet residual-branch maps over the saved steps of a diffusion process.

Real images go through DDIM inversion (calls at t=-1, 0, 20, ..., 960 for 50 steps); synthetic ones
through generation, whose calls run from noisy to clean, so its saved steps are mirrored. Every saved
step's features are handed to a consumer as soon as the UNet call ends (the capture's `on_step`), so
streaming them through the aggregator holds one step at a time whatever the number of steps S.

Saved steps are numbered in noise order: position 0 is the least noisy saved call (t=-1 for inversion).
"""

from __future__ import annotations

import fnmatch

import zlib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from diffprobe.drives import Drive
from diffprobe.errors import DiffprobeError
from diffprobe.hooks import Need, Reduce, Site
from diffprobe.hooks.sites import select_sites
from diffprobe.runner import Head, Plan, View, run_plans

DEFAULT_LAYERS = "up_blocks.*.resnets.*.hook_residual"
AUTO = "auto"
PROCESSES = ("inversion", "one_step", "generation")

Consumer = Callable[[int, dict[str, torch.Tensor]], None]


@dataclass
class ExtractionSettings:
    """layers: site glob or list; process: inversion | one_step | generation; num_steps: T scheduler
    steps; save_every: keep every k-th call counted back from the noisiest, plus the first (ref 5 ->
    S=11 of T=50); saved_steps: explicit inversion call indices instead; prompt: text for inversion
    (ref empty); sample_latent: VAE latent_dist.sample() (ref) instead of its mean."""

    layers: str | list[str] = DEFAULT_LAYERS
    process: str = "inversion"
    num_steps: int = 50
    save_every: int = 5
    saved_steps: list[int] | None = None
    prompt: str = ""
    image_size: int = 512
    sample_latent: bool = True
    guidance: float | None = None   # None: the model family's default (SD 7.5, the reference's; FLUX 3.5)

    def __post_init__(self) -> None:
        if self.process not in PROCESSES:
            raise DiffprobeError(f"hyperfeatures process must be one of {PROCESSES}, got {self.process!r}")
        if self.process == "one_step":
            self.num_steps, self.saved_steps = 1, [0]
        if self.num_steps < 1 or self.save_every < 1:
            raise DiffprobeError("num_steps and save_every must be at least 1")
        if self.image_size % 8:
            raise DiffprobeError(f"image_size must be a multiple of 8, got {self.image_size}")
        if self.saved_steps is not None:
            bad = [i for i in self.saved_steps if not 0 <= i < self.num_steps]
            if bad or not self.saved_steps:
                raise DiffprobeError(f"saved_steps must be call indices in 0..{self.num_steps - 1}, got {self.saved_steps}")

    def saved_calls(self) -> list[int]:
        """Inversion call indices kept, in noise order (ascending). Ref T=50, every 5: [0, 4, 9, ..., 49]."""
        if self.saved_steps is not None:
            return sorted(set(int(i) for i in self.saved_steps))
        last = self.num_steps - 1
        return sorted({0} | set(range(last, 0, -self.save_every)))

    @property
    def num_saved(self) -> int:
        return len(self.saved_calls())


def image_generator(seed: int, image: torch.Tensor) -> torch.Generator:
    """A generator for the VAE posterior sample of one image, seeded from (seed, the image's pixels), so the
    same image gets the same latent in training, evaluation and a resumed run, wherever its file lies."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(image.detach().cpu().numpy().tobytes()))


def default_layers(sites: Mapping[str, Site]) -> list[str]:
    """A UNet's decoder ResNet residual branches (the paper's 12 layers on SD 1.5); a transformer's block outputs
    (every block at one patch grid: the same one-resolution stack the aggregation then weighs)."""
    unet = [n for n in sites if fnmatch.fnmatchcase(n, DEFAULT_LAYERS)]
    return unet or [n for n, s in sites.items() if s.kind == "block"]


def layer_names(sites: Mapping[str, Site], layers) -> list[str]:
    """Resolve the layer selection ("auto": `default_layers`) to feature-site names (execution order); only
    resnet/block sites."""
    auto = layers == AUTO or (not isinstance(layers, str) and list(layers) == [AUTO])
    names = default_layers(sites) if auto else select_sites(sites, layers)
    bad = [n for n in names if sites[n].kind not in ("resnet", "block")]
    if bad:
        raise DiffprobeError(f"hyperfeatures layers must be feature sites (hook_residual/hook_out), not {bad[0]}")
    return names


class FeatureHead(Head):
    """Residual features over the saved steps of the configured process, handed to `consume(position,
    {layer: (B, C, h, w)})` as each denoiser call ends (streaming: one step held at a time).

    Inversion: the item's images (B, 3, H, W); generation: one image per prompt (its saved calls mirrored into
    noise order, the cond half of the CFG batch kept). finish: the timestep of each saved position.
    """

    name = "features"

    def __init__(self, cfg: ExtractionSettings, consume: Consumer | None = None, layers: list[str] | None = None,
                 prompts: list[str] | None = None):
        self.cfg, self.consume, self.layers, self.prompts = cfg, consume, layers, prompts
        calls = cfg.saved_calls()
        if cfg.process == "generation":
            if not prompts:
                raise DiffprobeError("hyperfeatures generation needs prompts")
            self.position = {cfg.num_steps - 1 - c: s for s, c in enumerate(calls)}  # generation: noisy -> clean
        else:
            self.position = {c: s for s, c in enumerate(calls)}

    def plan(self, sites: Mapping[str, Site]) -> Plan:
        layers = self.layers or layer_names(sites, self.cfg.layers)
        process = "generation" if self.cfg.process == "generation" else "inversion"
        drive = Drive(process, num_steps=self.cfg.num_steps, guidance=self.cfg.guidance,
                      sample_latent=self.cfg.sample_latent)
        prompt = tuple(self.prompts) if process == "generation" else self.cfg.prompt
        size = (self.cfg.image_size, self.cfg.image_size)
        return Plan(drive, (Need(tuple(layers), Reduce(steps="last")),), prompt=prompt, size=size)

    def inputs(self, item) -> torch.Tensor | None:
        return item

    def add(self, state: dict, position: int, features: dict[str, torch.Tensor]) -> None:
        """Take one saved step's features; `state` is the pass's view.state."""
        self.consume(position, features)

    def on_call(self, call: int, t: float, view: View) -> None:
        if call in self.position:
            view.state.setdefault("timesteps", {})[self.position[call]] = t
            self.add(view.state, self.position[call], {n: view[n] for n in view.names})

    def timesteps(self, view: View) -> list[float]:
        """The timestep of each saved position, once the pass is over."""
        seen = view.state.get("timesteps", {})
        if len(seen) != len(self.position):
            raise DiffprobeError(f"the {self.cfg.process} made {len(view.timesteps)} denoiser calls; saved steps "
                                 f"{self.cfg.saved_calls()} need more")
        return [seen[s] for s in range(len(self.position))]

    def finish(self, view: View, item) -> list[float]:
        return self.timesteps(view)


class DescriptorHead(FeatureHead):
    """Hyperfeature descriptors of an item's image: every saved step of the extraction streamed through the
    aggregator `net` (one step held at a time); finish -> (B, D, H, H). The item is an Item holding a PIL image
    (resized whole to the extraction's size with PIL bilinear, the reference's) or a (B, 3, S, S) tensor; its
    VAE sample is drawn from (seed, its pixels), so its descriptors do not depend on the pass it joins."""

    name = "hyperfeatures"

    def __init__(self, net, cfg: ExtractionSettings, seed: int = 0):
        super().__init__(cfg, layers=net.config.layers)
        self.net, self.seed = net, seed

    def inputs(self, item) -> torch.Tensor:
        from diffprobe.data.images import image_to_tensor

        if isinstance(item, torch.Tensor):
            return item
        return image_to_tensor(item.image, size=self.cfg.image_size, crop="none", resize="bilinear")

    def draws(self, x: torch.Tensor | None) -> torch.Generator:
        return image_generator(self.seed, x)

    def add(self, state: dict, position: int, features: dict[str, torch.Tensor]) -> None:
        if "aggregate" not in state:
            state["aggregate"] = self.net.stream()
        state["aggregate"].add(position, features)

    def finish(self, view: View, item) -> torch.Tensor:
        self.timesteps(view)
        return view.state["aggregate"].result()


def run_extraction(bb, images: torch.Tensor | None, cfg: ExtractionSettings, consume: Consumer,
                   layers: list[str] | None = None, prompts: list[str] | None = None,
                   generator: torch.Generator | None = None) -> tuple[list[float], torch.Tensor | None]:
    """Run the configured process and call consume(position, {layer: (B, C, h, w)}) once per saved step.

    images: (B, 3, H, W) in [-1, 1] (ignored for generation, which needs `prompts`). Returns the
    timestep of each saved position (noise order) and, for generation, the generated images
    (B, 3, H, W) in [0, 1] (else None). The denoiser runs without gradients.
    """
    head = FeatureHead(cfg, consume, layers, prompts)
    x = None if cfg.process == "generation" else images
    with torch.no_grad():
        (view,) = run_plans(bb, [head.plan(bb.probe.sites)], [x], generator, on_call=[head.on_call])
    return head.finish(view, x), view.images


def extract_descriptors(bb, net, images: torch.Tensor, cfg: ExtractionSettings,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Hyperfeature descriptors (B, D, H, H) of `images`: the DescriptorHead run alone (latents drawn from
    `generator`)."""
    head = DescriptorHead(net, cfg)
    with torch.no_grad():
        (view,) = run_plans(bb, [head.plan(bb.probe.sites)], [images], generator, on_call=[head.on_call])
    return head.finish(view, images)


def extract_features(bb, images: torch.Tensor, cfg: ExtractionSettings,
                     layers: list[str] | None = None, dtype: torch.dtype | None = None,
                     generator: torch.Generator | None = None) -> list[dict[str, torch.Tensor]]:
    """All raw maps, held: steps[position][layer] = (B, C, h, w), optionally cast to `dtype`
    (e.g. float16 to halve a training cache)."""
    steps: dict[int, dict[str, torch.Tensor]] = {}

    def keep(pos: int, feats: dict[str, torch.Tensor]) -> None:
        steps[pos] = {n: f.to(dtype) if dtype is not None else f for n, f in feats.items()}

    run_extraction(bb, images, cfg, keep, layers=layers, generator=generator)
    return [steps[s] for s in sorted(steps)]
