"""The DiffSeg pipeline on a backbone: one UNet call under a self-attention capture, then the head.

Shared by `task=diffseg` (user images) and `task=diffseg_eval` (datasets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from diffprobe.data.images import check_resize
from diffprobe.errors import DiffprobeError
from diffprobe.heads.diffseg import DiffSegParams, SegmentationResult, segment
from diffprobe.heads.diffseg.semantics import word_maps
from diffprobe.heads.diffseg.sites import attention_groups, maps_by_grid
from diffprobe.hooks import ProbeRegistry, Reduce
from diffprobe.runners import encode_images, encode_prompt, unet_step

log = logging.getLogger(__name__)
DEFAULT_TAU = 0.9  # the reference's merge threshold, when neither the model nor the dataset sets one


@dataclass
class DiffSegSettings:
    """Task keys shared by task=diffseg and task=diffseg_eval (see conf/task/diffseg.yaml)."""

    timestep: int = 300
    add_noise: bool = False
    prompt: str = ""
    tau: Any = DEFAULT_TAU
    iterations: int = 3
    anchors: int = 16
    merge: str = "reference"
    fp16_kl: bool | None = None
    weights: Any = None
    refine: bool = False
    image_size: int | None = None
    resize: str = "bilinear_tf"


def default_tau(model_cfg, dataset_tau: float | None = None) -> float:
    """tau for a task that leaves it null: the model's calibrated model.diffseg_tau (KL distances between
    maps scale with the model; mini has one), else the dataset's (the paper's per dataset), else 0.9."""
    return next((v for v in (model_cfg.get("diffseg_tau"), dataset_tau) if v is not None), DEFAULT_TAU)


def head_params(settings: DiffSegSettings) -> DiffSegParams:
    """The head's parameters from the task keys (validated: DiffprobeError on bad values)."""
    tau = settings.tau if isinstance(settings.tau, (int, float, str)) else list(settings.tau)
    weights = settings.weights if settings.weights is None or isinstance(settings.weights, str) else list(
        settings.weights)
    check_resize(settings.resize)
    return DiffSegParams(tau=tau, iterations=settings.iterations, anchors=settings.anchors, merge=settings.merge,
                         fp16_kl=settings.fp16_kl, weights=weights, refine=settings.refine)


def token_groups(tokenizer, prompt: str, words: list[str]) -> list[list[int]]:
    """Positions of each word's tokens in the tokenised `prompt` (first occurrence)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    groups = []
    for word in words:
        sub = tokenizer(word, add_special_tokens=False).input_ids
        starts = [i for i in range(len(ids) - len(sub) + 1) if sub and ids[i:i + len(sub)] == sub]
        if not starts:
            raise DiffprobeError(f"word {word!r} is not found in the tokenised prompt {prompt!r} (too many words?)")
        groups.append(list(range(starts[0], starts[0] + len(sub))))
    return groups


class DiffSegPipeline:
    """Backbone + registry + head parameters; `segment(x, size)` for a (1, 3, S, S) image tensor."""

    def __init__(self, bb, settings: DiffSegSettings, seed: int = 0):
        self.bb, self.settings, self.seed = bb, settings, seed
        self.probe = ProbeRegistry(bb.unet)
        self.self_groups = attention_groups(self.probe.sites, "self_attn")
        self.size = int(settings.image_size or bb.sample_size)
        deepest = bb.vae_factor * max(s.divisor for s in self.probe.sites.values())
        if self.size % deepest:
            raise DiffprobeError(f"image_size must be a multiple of {deepest} for this model, not {self.size}")
        finest = self.size // bb.vae_factor // min(self.self_groups)
        self.params = head_params(settings)
        if self.params.anchors > finest:
            log.warning("anchors=%d is more than the %d positions per side of the finest attention grid; using %d",
                        self.params.anchors, finest, finest)
            self.params = self.params.replace(anchors=finest)
        self.context = encode_prompt(bb, [settings.prompt])

    def _unet(self, x: torch.Tensor, names: list[str], context) -> Any:
        latents = encode_images(self.bb, x)
        generator = torch.Generator().manual_seed(self.seed)
        noise = "random" if self.settings.add_noise else None
        with torch.no_grad(), self.probe.capture(names, reduce=Reduce(heads="mean")) as cache:
            unet_step(self.bb, latents, self.settings.timestep, context, noise=noise, generator=generator)
        return cache

    def self_attention(self, x: torch.Tensor) -> dict:
        """{query grid: (L, Q, Q)} head-mean self-attention probabilities of image x (1, 3, S, S)."""
        names = [n for group in self.self_groups.values() for n in group]
        return maps_by_grid(self._unet(x, names, self.context), self.self_groups)

    def segment(self, x: torch.Tensor, size: tuple[int, int]) -> SegmentationResult:
        """Label map of image x at `size` (H, W)."""
        return segment(self.self_attention(x), size=size, params=self.params)

    def word_maps(self, x: torch.Tensor, words: list[str], size: tuple[int, int]) -> torch.Tensor:
        """(n_words, H, W) cross-attention of each word, from a second UNet call on the prompt of the words."""
        prompt = ", ".join(words)
        groups = token_groups(self.bb.tokenizer, prompt, words)
        cross = attention_groups(self.probe.sites, "cross_attn")
        cache = self._unet(x, [n for g in cross.values() for n in g], encode_prompt(self.bb, [prompt]))
        return word_maps(maps_by_grid(cache, cross), groups, size, self.params.weights)

