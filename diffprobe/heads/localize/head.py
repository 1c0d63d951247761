"""The localisation head on the runner: one call (DiffSeg's by default: t=300, clean latent, so the two
heads share it), each word's cross-attention map and the aggregated self-attention, the map refined over
the attention graph, then a mask and a box per word."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError
from diffprobe.eval.wsol import component_boxes
from diffprobe.heads.call import CallSettings, model_input, output_size
from diffprobe.heads.diffseg.aggregate import aggregate
from diffprobe.heads.diffseg.semantics import word_maps
from diffprobe.heads.diffseg.sites import attention_groups, attention_levels, maps_by_grid, select_divisors
from diffprobe.heads.localize.refine import RefineSettings, refine
from diffprobe.hooks import Need, Reduce
from diffprobe.runner import Head, Item, Plan, View

log = logging.getLogger(__name__)
PIXEL_BYTES = 24   # a word's raw and refined maps, its mask and the upsampling's temporaries: 16 measured


@dataclass
class LocalizeSettings(CallSettings):
    """The localize.* keys: the call (DiffSeg's by default), the words, the refinement, the mask threshold."""

    timestep: int = 300
    resize: str = "bilinear_tf"
    words: list[str] = field(default_factory=list)
    prompt: str | None = None    # None: "a w1 and a w2 ..."
    method: str = RefineSettings.method      # the refinement's keys default to RefineSettings'
    power: int = RefineSettings.power
    restart: float = RefineSettings.restart
    beta: float = RefineSettings.beta
    graph: str = RefineSettings.graph
    temperature: float = RefineSettings.temperature
    neighbours: int = RefineSettings.neighbours
    threshold: float = 0.5
    divisors: Any = None         # the attention levels read, by resolution divisor; None: all

    def params(self) -> RefineSettings:
        self.validate()
        self.levels()
        if not self.words:
            raise DiffprobeError("localize needs words to find: words=[bird] (or words=[cat,sofa])")
        if not 0 <= self.threshold < 1:
            raise DiffprobeError(f"the mask threshold must lie in [0, 1), got {self.threshold}")
        return RefineSettings(self.method, int(self.power), float(self.restart), float(self.beta), self.graph,
                            float(self.temperature), int(self.neighbours))

    def levels(self) -> tuple[int, ...] | None:
        return attention_levels(self.divisors, "localize.divisors")

    def full_prompt(self) -> str:
        return self.prompt if self.prompt else " and ".join(f"a {w}" for w in self.words)


@dataclass
class Localization:
    """words (n,); raw and refined (n, H, W) heat maps in [0, 1] (min-max per word) at the analysed size;
    masks (n, H, W) bool (refined >= threshold); boxes (n,) of (x0, y0, x1, y1) (exclusive ends) of each
    mask's largest component, None for an empty mask; components: every component's box per word."""

    words: list[str]
    raw: torch.Tensor
    refined: torch.Tensor
    masks: torch.Tensor
    boxes: list
    components: list


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """(n, H, W) min-max normalised per map (a flat map becomes zeros)."""
    flat = maps.reshape(len(maps), -1)
    lo, hi = flat.min(1, keepdim=True)[0], flat.max(1, keepdim=True)[0]
    return ((flat - lo) / (hi - lo).clamp_min(1e-30)).reshape(maps.shape)


class LocalizeHead(Head):
    """Cross- and self-attention of one call (heads averaged); `finish` localises every word."""

    name = "localize"

    def __init__(self, settings: LocalizeSettings, token_groups: list[list[int]], image_size: int):
        self.settings, self.token_groups, self.size = settings, token_groups, int(image_size)
        self.params = settings.params()

    def groups(self, sites: Mapping, kind: str) -> dict[int, list[str]]:
        """{divisor: site names} of the levels read, for kind "cross_attn" or "self_attn", from a model's sites or
        a view's."""
        return select_divisors(attention_groups(sites, kind), self.settings.levels(), "localize.divisors")

    def plan(self, sites: Mapping) -> Plan:
        cross, self_attn = self.groups(sites, "cross_attn"), self.groups(sites, "self_attn")
        names = tuple(n for groups in (cross, self_attn) for g in groups.values() for n in g)
        return Plan(self.settings.drive(), (Need(names, Reduce(heads="mean")),), prompt=self.settings.full_prompt())

    def work(self, sites: Mapping, latent_hw: tuple[int, int], item: Item) -> int:
        """The finest layers' (Q, Q) maps stacked, their aggregate, its float64 copy and a P^k product; each
        word's raw and refined maps, mask and their upsampling at the output size (PIXEL_BYTES a pixel)."""
        self_attn = self.groups(sites, "self_attn")
        finest = self_attn[min(self_attn)]
        h, w = sites[finest[0]].resolution(latent_hw)
        size = output_size(item, self.settings.crop)
        return (len(finest) + 4) * (h * w) ** 2 * 4 + len(self.settings.words) * PIXEL_BYTES * size[0] * size[1]

    def inputs(self, item: Item) -> torch.Tensor:
        return model_input(item.image, self.size, self.settings.crop, self.settings.resize)[0]

    def attention(self, view: View) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(word maps (n, h, w), aggregated self-attention (Q, Q), grid (h, w)) of the view's first image, on
        the finest self-attention grid: each word's tokens summed, resolutions weighted as DiffSeg's."""
        probs, grid = aggregate(maps_by_grid(view, self.groups(view.sites, "self_attn")))
        return word_maps(maps_by_grid(view, self.groups(view.sites, "cross_attn")), self.token_groups, grid), probs, grid

    def finish(self, view: View, item: Item) -> Localization:
        words, probs, grid = self.attention(view)
        refined = refine(words.reshape(len(words), -1), probs, grid, self.params).reshape(words.shape)
        size = output_size(item, self.settings.crop)
        raw, ref = (normalise_maps(F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])
                    for m in (words, refined))
        masks = ref >= self.settings.threshold
        boxes, components = [], []
        for word, mask in zip(self.settings.words, masks):
            found, areas = component_boxes(mask.numpy())
            if not len(found):
                log.warning("the map of %r is flat: no mask and no box", word)
            boxes.append(found[int(np.argmax(areas))] if len(found) else None)
            components.append(found)
        return Localization(list(self.settings.words), raw, ref, masks, boxes, components)
