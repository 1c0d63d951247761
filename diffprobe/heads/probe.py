"""The probe head: whatever sites the user selects, captured in one call, handed back as they are."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.heads.call import CallSettings, model_input
from diffprobe.hooks import Need, Reduce
from diffprobe.hooks.sites import select_sites
from diffprobe.runner import Head, Item, Plan, View


CROSS = "cross"  # probe.sites=[cross]: every cross-attention map (UNet attn2, a transformer's image-to-text blocks)


@dataclass
class ProbeSettings(CallSettings):
    """The probe.* keys: the call (CallSettings), the sites (globs), the head reduction, the picture."""

    LIMITS: ClassVar[dict] = {"show": "1..1000"}

    sites: list[str] = field(default_factory=lambda: [CROSS])
    timestep: int = 100
    heads: str = "mean"
    show: int = 8

    def validate(self) -> None:
        super().validate()
        if self.heads not in ("mean", "sum", "none"):
            raise DiffprobeError(f"heads must be mean, sum or none, not {self.heads!r}")


class ProbeHead(Head):
    """Captures the selected sites; `finish` returns the view (site -> tensor, grids, timesteps)."""

    name = "probe"

    def __init__(self, settings: ProbeSettings, image_size: int):
        settings.validate()
        self.settings, self.size = settings, int(image_size)

    def plan(self, sites: Mapping) -> Plan:
        chosen = list(self.settings.sites)
        names = select_sites(sites, lambda s: s.kind == "cross_attn") if chosen == [CROSS] else \
            select_sites(sites, chosen)
        need = Need(tuple(names), Reduce(heads=self.settings.heads))
        return Plan(self.settings.drive(), (need,), prompt=self.settings.prompt)

    def inputs(self, item: Item) -> torch.Tensor:
        return model_input(item.image, self.size, self.settings.crop, self.settings.resize)[0]

    def finish(self, view: View, item: Item) -> View:
        return view
