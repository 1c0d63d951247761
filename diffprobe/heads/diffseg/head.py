"""The DiffSeg head on the runner: one denoiser call at t=300 (clean latent, empty prompt: the reference),
the self-attention of every resolution averaged over heads, then `segment`. Optional words name the
segments through a second head, `WordMapsHead`, whose pass the runner shares (its own rows of the batch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.heads.call import CallSettings, model_input, output_size
from diffprobe.heads.diffseg.ncut import NcutSettings, ncut_segment
from diffprobe.heads.diffseg.segment import (SegmentSettings, SegmentationResult, compact_labels, labels_bytes,
                                             segment)
from diffprobe.heads.diffseg.semantics import word_maps
from diffprobe.heads import pamr
from diffprobe.heads.diffseg.sites import attention_groups, attention_levels, maps_by_grid, select_divisors
from diffprobe.hooks import Need, Reduce
from diffprobe.runner import Head, Item, Plan, View

log = logging.getLogger(__name__)
DEFAULT_TAU = 0.9  # the reference's merge threshold, when neither the model nor the dataset sets one
METHODS = ("diffseg", "ncut")
WORD_PIXEL_BYTES = 16   # a word's map at the output size and its upsampling: 12 measured


@dataclass
class DiffSegSettings(CallSettings):
    """The head's keys (conf/head/diffseg.yaml): the call (reference: t=300, clean latent, empty prompt,
    centre square, tf.image.resize) and the head's parameters (SegmentSettings)."""

    LIMITS: ClassVar[dict] = {"iterations": "2..100", "anchors": "1..65536", "ncut_tau": "> 0", "ncut_alpha": "> 0",
                                 "ncut_walk_steps": "1..64"}

    timestep: int = 300
    resize: str = "bilinear_tf"
    tau: Any = None
    iterations: int = 3
    anchors: int = 16
    merge: str = "reference"
    fp16_kl: bool | None = None
    weights: Any = None
    divisors: Any = None
    refine: bool = False
    method: str = "diffseg"
    ncut_tau: float = 0.5
    ncut_alpha: float = 10.0
    ncut_affinity: str = "attention_rows"
    ncut_walk_steps: int = 1
    pamr: bool = False

    def ncut_params(self) -> NcutSettings:
        if self.weights is not None and not isinstance(self.weights, (str, list, tuple, dict)):
            raise DiffprobeError(f"diffseg.weights is one weight per attention level ([w1, w2, ...], finest first) "
                                 f"or null, not {self.weights!r}")
        weights = self.weights if self.weights is None or isinstance(self.weights, str) else list(self.weights)
        return NcutSettings(tau=float(self.ncut_tau), alpha=float(self.ncut_alpha), affinity=self.ncut_affinity,
                            walk_steps=int(self.ncut_walk_steps), weights=weights)

    def params(self) -> SegmentSettings:
        """The head's parameters (validated: DiffprobeError on bad values); tau must be resolved first."""
        self.validate()
        if self.method not in METHODS:
            raise DiffprobeError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        self.ncut_params()
        self.levels()
        if self.tau is None:
            raise DiffprobeError("DiffSeg needs tau (default_tau resolves the model's or the dataset's)")
        tau = self.tau if isinstance(self.tau, (int, float, str)) else list(self.tau)
        weights = self.weights if self.weights is None or isinstance(self.weights, str) else list(self.weights)
        return SegmentSettings(tau=tau, iterations=self.iterations, anchors=self.anchors, merge=self.merge,
                             fp16_kl=self.fp16_kl, weights=weights, refine=self.refine)

    def levels(self) -> tuple[int, ...] | None:
        """The resolution divisors of the attention levels read (1 = the UNet's finest), or None: all."""
        return attention_levels(self.divisors, "diffseg.divisors")


def default_tau(model_cfg, dataset_tau: float | None = None) -> float:
    """tau for a run that leaves it null: the model's calibrated model.diffseg_tau (KL distances between
    maps scale with the model; mini has one), else the dataset's (the paper's per dataset), else 0.9."""
    return next((v for v in (model_cfg.get("diffseg_tau"), dataset_tau) if v is not None), DEFAULT_TAU)


def image_at(image, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float in [0, 1]: the analysed box (left, top, width, height) of a PIL image at size (H, W)."""
    import numpy as np
    from PIL import Image

    left, top, bw, bh = box
    part = image.convert("RGB").crop((left, top, left + bw, top + bh)).resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(part, dtype=np.float32) / 255.0).permute(2, 0, 1)


class DiffSegHead(Head):
    """Segmentation from self-attention: `plan` asks for every self-attention site (heads averaged); `finish`
    segments by DiffSeg's merge (method "diffseg") or recursive normalised cut ("ncut"), then optionally
    refines the labels by PAMR on the image's colours.

    item: an Item whose image is a PIL image; labels come at item.data["output_size"] or the analysed box.
    """

    name = "diffseg"

    def __init__(self, settings: DiffSegSettings, image_size: int):
        self.settings, self.size = settings, int(image_size)
        self.params = settings.params()
        self.ncut = settings.ncut_params()

    def groups(self, sites: Mapping) -> dict[int, list[str]]:
        """{divisor: self-attention site names} of the levels read, from a model's sites or a view's."""
        return select_divisors(attention_groups(sites, "self_attn"), self.settings.levels(), "diffseg.divisors")

    def plan(self, sites: Mapping) -> Plan:
        names = tuple(n for group in self.groups(sites).values() for n in group)
        return Plan(self.settings.drive(), (Need(names, Reduce(heads="mean")),), prompt=self.settings.prompt)

    def work(self, sites: Mapping, latent_hw: tuple[int, int], item: Item) -> int:
        """The finest layers' (Q, Q) maps stacked, their aggregate and two more like it; the labels at the
        output size, and PAMR's refinement of them when on."""
        groups = self.groups(sites)
        finest = groups[min(groups)]
        h, w = sites[finest[0]].resolution(latent_hw)
        size = output_size(item, self.settings.crop)
        refine = pamr.refine_bytes(*size) if self.settings.pamr else 0
        return (len(finest) + 3) * (h * w) ** 2 * 4 + labels_bytes(size) + refine

    def inputs(self, item: Item) -> torch.Tensor:
        return model_input(item.image, self.size, self.settings.crop, self.settings.resize)[0]

    def box(self, image) -> tuple[int, int, int, int]:
        """(left, top, width, height) of the part of a PIL image that is segmented."""
        from diffprobe.heads.call import analysed_box

        return analysed_box(image.width, image.height, self.settings.crop)

    def maps(self, view: View) -> dict[tuple[int, int], torch.Tensor]:
        """{query grid (h, w): (L, Q, Q)} head-averaged self-attention of the view's first image."""
        return maps_by_grid(view, self.groups(view.sites))

    def finish(self, view: View, item: Item) -> SegmentationResult:
        maps = self.maps(view)
        size = output_size(item, self.settings.crop)
        if self.settings.method == "ncut":
            result = ncut_segment(maps, size, self.ncut)
        else:
            finest = max(h for h, _ in maps)
            params = self.params
            if params.anchors > finest:
                log.warning("anchors=%d is more than the %d positions per side of the finest attention grid; "
                            "using %d", params.anchors, finest, finest)
                params = params.replace(anchors=finest)
            result = segment(maps, size=size, params=params)
        if self.settings.pamr:
            labels = pamr.refine_labels(result.labels, image_at(item.image, self.box(item.image), size))
            labels, proposals = compact_labels(labels, result.proposals)
            result = replace(result, labels=labels, proposals=proposals)
        return result


class WordMapsHead(Head):
    """Cross-attention maps of words (DiffSeg's semantic labels): one call on the prompt "w1, w2, ...",
    each word's tokens summed, resolutions aggregated with DiffSeg's weights -> (n_words, H, W)."""

    name = "words"

    def __init__(self, words: list[str], groups: list[list[int]], settings: DiffSegSettings, image_size: int):
        self.words, self.token_groups = list(words), groups
        self.settings = replace(settings, prompt=", ".join(words))
        self.size, self.weights = int(image_size), settings.params().weights

    def groups(self, sites: Mapping) -> dict[int, list[str]]:
        """{divisor: cross-attention site names} of the levels read, from a model's sites or a view's."""
        return select_divisors(attention_groups(sites, "cross_attn"), self.settings.levels(), "diffseg.divisors")

    def plan(self, sites: Mapping) -> Plan:
        names = tuple(n for group in self.groups(sites).values() for n in group)
        return Plan(self.settings.drive(), (Need(names, Reduce(heads="mean")),), prompt=self.settings.prompt)

    def inputs(self, item: Item) -> torch.Tensor:
        return model_input(item.image, self.size, self.settings.crop, self.settings.resize)[0]

    def work(self, sites: Mapping, latent_hw: tuple[int, int], item: Item) -> int:
        """Each level's (Q, T) maps stacked and averaged; each word's map at the output size and its upsampling."""
        grids = 0
        for group in self.groups(sites).values():
            h, w = sites[group[0]].resolution(latent_hw)
            grids += (len(group) + 1) * h * w * (sites[group[0]].text_tokens or 77) * 4
        size = output_size(item, self.settings.crop)
        return grids + len(self.words) * WORD_PIXEL_BYTES * size[0] * size[1]

    def finish(self, view: View, item: Item) -> torch.Tensor:
        return word_maps(maps_by_grid(view, self.groups(view.sites)), self.token_groups,
                         output_size(item, self.settings.crop), self.weights)
