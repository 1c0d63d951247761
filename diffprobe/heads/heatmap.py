"""The word heat-map head: one generation from a prompt, or the DDIM inversion of a real image under its caption,
its cross-attention captured over every step (a running mean, or every step kept), and DAAM's map of each word at
the image's size (diffprobe.heads.heatmaps)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from diffprobe.concepts import ConceptAttention
from diffprobe.drives import Drive
from diffprobe.errors import DiffprobeError
from diffprobe.heads.call import model_input
from diffprobe.heads.heatmaps import DAAM_SKIPPED_DIVISOR, daam_image_maps, daam_sites, daam_word_maps
from diffprobe.hooks import Need, Reduce, Site
from diffprobe.hooks.sites import select_sites
from diffprobe.runner import Head, Item, Plan, View


@dataclass
class HeatmapSettings:
    """steps: generation steps; guidance: its scale (None: the family's, SD 7.5, PixArt 4.5, FLUX 3.5); per_step:
    also every step's maps (memory grows with the steps; without it a running mean, flat); sites: the
    cross-attention sites read (None: DAAM's, every one but a UNet's mid block; names or globs); concepts: words
    outside the prompt mapped by ConceptAttention (diffprobe.concepts) over the same pass; concept_space: "output"
    or "keys", on cross-attention models (ignored on joint-attention ones, which use ConceptAttention's own)."""

    LIMITS = {"steps": "1..1000", "guidance": ">= 0"}

    steps: int = 50
    guidance: float | None = None
    per_step: bool = False
    sites: list[str] | None = None
    concepts: list[str] | None = None
    concept_space: str = "output"

    def check_concepts(self) -> None:
        from diffprobe.concepts import SPACES

        if self.concept_space not in SPACES:
            raise DiffprobeError(f"concept_space must be one of {', '.join(SPACES)}, not {self.concept_space!r}")
        if self.concepts is not None and not (self.concepts and all(isinstance(c, str) and c.strip()
                                                                    for c in self.concepts)):
            raise DiffprobeError("concepts must be a list of words, e.g. 'concepts=[bird,sky,tree]'")


class HeatmapHead(Head):
    """Plan: a generation of `prompt` at size x size (or, `real`, the DDIM inversion of the item's image, its centre
    square, under `prompt`) capturing cross-attention with every head kept; finish -> {"image": (3, H, W) in
    [0, 1], "maps": (n words, H, W), "per_step": (S, n, H, W) or None, "concepts": (C, H, W) or None, "page"},
    the words being the column groups `groups` (the backbone's word_positions)."""

    name = "heatmap"

    def __init__(self, settings: HeatmapSettings, size: int, prompt: str, groups: Sequence[Sequence[int]],
                 grid_factor: int, real: bool = False):
        self.settings, self.size, self.prompt, self.real = settings, int(size), prompt, real
        self.groups, self.grid_factor = [list(g) for g in groups], int(grid_factor)

    def sites_of(self, sites: Mapping[str, Site]) -> list[str]:
        chosen = self.settings.sites
        names = select_sites(sites, chosen) if chosen else daam_sites(sites)
        wrong = [n for n in names if sites[n].kind != "cross_attn"]
        if wrong or not names:
            raise DiffprobeError(f"heat maps read cross-attention sites; {wrong[0] if wrong else chosen} is not one")
        return names

    def plan(self, sites: Mapping[str, Site]) -> Plan:
        s = self.settings
        reduce = Reduce(heads="none", steps="all" if s.per_step else "mean")
        needs = (Need(self.sites_of(sites), reduce),)
        watch = partial(ConceptAttention, concepts=s.concepts, space=s.concept_space) if s.concepts else None
        if self.real:
            return Plan(Drive("inversion", num_steps=s.steps), needs, prompt=self.prompt, watch=watch)
        return Plan(Drive("generation", num_steps=s.steps, guidance=s.guidance), needs, prompt=(self.prompt,),
                    size=(self.size, self.size), watch=watch)

    def inputs(self, item: Item) -> torch.Tensor | None:
        """The real image's centre square in [-1, 1] (1, 3, size, size); a generation has none."""
        return model_input(item.image, self.size, "center", "bilinear")[0] if self.real else None

    def finish(self, view: View, item: Item) -> dict:
        names = [n for n, s in view.sites.items() if s.kind == "cross_attn"]

        stacked = self.settings.per_step

        def layers(step: int | None):   # [(divisor, grid, (heads, Q, T))] of the image at one step, or the mean
            def one(t: torch.Tensor) -> torch.Tensor:
                return (t.mean(0) if step is None else t[step]) if stacked else t
            return [(view.sites[n].divisor, view.grid(n), one(view[n])[0]) for n in names]

        steps = view[names[0]].shape[0] if stacked else 0
        per_step = (torch.stack([daam_image_maps(layers(k), self.groups, self.grid_factor) for k in range(steps)])
                    if stacked else None)
        image = (self.inputs(item)[0] + 1) / 2 if self.real else view.images[0]
        maps = daam_image_maps(layers(None), self.groups, self.grid_factor)
        concepts = None
        if self.settings.concepts:   # the head's row of ConceptAttention's maps, at the word maps' size
            watch = view.state["watch"]
            concepts = watch.image_maps(tuple(maps.shape[-2:]))[view.state["rows"]][0]
        return {"image": image.float().clamp(0, 1), "per_step": per_step, "maps": maps, "concepts": concepts,
                "page": self._page(layers, names, steps, concepts)}

    def _page(self, layers, names: list[str], steps: int, concepts: torch.Tensor | None) -> dict:
        """report.html's slices on the finest kept grid: {(0, 0): DAAM's map, (i, 0): layer i's alone (DAAM's steps
        on one layer, resized to that grid), (0, k + 1): step k's over every layer}, and the slider names; the
        concept maps (C, H, W), when there are, follow the words in every slice (the sliders do not move them)."""
        every = layers(None)
        kept = [i for i, (d, _, _) in enumerate(every) if d != DAAM_SKIPPED_DIVISOR]
        overall = daam_word_maps(every, self.groups)                         # (n, h, w)
        slices = {(0, 0): overall}
        for j, i in enumerate(kept, 1):
            one = daam_word_maps([every[i]], self.groups)[None]
            slices[(j, 0)] = F.interpolate(one, size=overall.shape[-2:], mode="bicubic").clamp_(min=0)[0]
        for k in range(steps):
            slices[(0, k + 1)] = daam_word_maps(layers(k), self.groups)
        if concepts is not None:
            small = F.interpolate(concepts[None], size=overall.shape[-2:], mode="bilinear", align_corners=False)[0]
            slices = {key: torch.cat([v, small]) for key, v in slices.items()}
        short = [names[i].replace(".transformer_blocks", "").replace(".hook_probs", "").replace(".hook_img2txt", "")
                 for i in kept]
        return {"slices": slices, "layers": ["all layers (DAAM)", *short],
                "steps": ["all steps", *(f"call {k}" for k in range(steps))]}
