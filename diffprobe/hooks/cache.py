"""The cache of captured tensors, keyed by site name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from einops import rearrange
import torch
import torch.nn.functional as F

from diffprobe.hooks.needs import Reduce


@dataclass
class _Entry:
    value: torch.Tensor | None = None  # "last" / "mean" (running sum)
    count: int = 0
    steps: dict[int, torch.Tensor] = field(default_factory=dict)  # "all" / list


class ActivationCache:
    """Tensors captured by `ProbeRegistry.capture`, keyed by site name.

    cache[name]:
      attention probabilities (B, Q, K) with heads reduced, (B, heads, Q, K) with heads="none";
        Q = h*w queries in row-major order of cache.grid(name); K = h*w keys (self) or tokens (cross);
      features (resnet residual, block output) (B, C, h, w);
      with Reduce.steps "all" or a list: a leading step axis (S, B, ...), steps in call order.
    B is the kept part of the batch (see BatchLayout).
    """

    def __init__(self, reduce: Reduce, sites: dict):
        self.reduce = reduce
        self.sites = sites
        self.timesteps: list[float] = []
        self.current: dict[str, torch.Tensor] = {}  # the tensors of the latest model call (for on_step)
        self._entries: dict[str, _Entry] = {}
        self._grids: dict[str, tuple[int, int]] = {}
        self._key_grids: dict[str, tuple[int, int]] = {}

    @classmethod
    def from_tensors(cls, sites: Mapping, tensors: Mapping[str, torch.Tensor],
                     grids: Mapping[str, tuple[int, int]] | None = None, timesteps: Sequence[float] = (0.0,),
                     reduce: Reduce = Reduce()) -> "ActivationCache":
        """A cache holding given tensors, as a capture would have stored them: for testing a head without
        a model. sites: name -> Site (those of `tensors` are kept); grids: query grid per name (default:
        square from the query count for attention, the map's own size for features)."""
        from diffprobe.hooks.attention import query_grid

        cache = cls(reduce, {n: sites[n] for n in tensors})
        cache.timesteps = list(timesteps)
        for name, value in tensors.items():
            site = sites[name]
            grid = (grids or {}).get(name)
            if grid is None:
                grid = query_grid(value.shape[-2], None) if site.is_attention else tuple(value.shape[-2:])
            steps = value if reduce.stacks_steps else [value]
            for step, v in enumerate(steps):
                cache._put(name, step, v, grid=grid, key_grid=grid if site.kind == "self_attn" else None)
        return cache

    # -- filled by the capture ---------------------------------------------------------------
    def _put(self, name: str, step: int, value: torch.Tensor, grid=None, key_grid=None) -> None:
        if grid is not None:
            self._grids[name] = grid
        if key_grid is not None:
            self._key_grids[name] = key_grid
        entry = self._entries.setdefault(name, _Entry())
        mode = self.reduce.steps
        if mode == "last":
            entry.value, entry.count = value, 1
        elif mode == "mean":
            entry.value = value if entry.value is None else entry.value + value
            entry.count += 1
        elif self.reduce.keeps(step):
            entry.steps[step] = value

    # -- read ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Captured site names, in execution order."""
        return [n for n in self.sites if n in self._entries]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        if self.reduce.stacks_steps:
            if not entry.steps:
                raise KeyError(f"{name}: no kept step was captured (steps={self.reduce.steps!r})")
            return torch.stack([entry.steps[s] for s in sorted(entry.steps)])
        return entry.value if entry.count == 1 else entry.value / entry.count

    def step(self, name: str, step: int) -> torch.Tensor:
        """The (B, ...) tensor of UNet call `step`, when steps are kept ("all" or a list)."""
        entry = self._entry(name)
        if step not in entry.steps:
            raise KeyError(f"{name}: step {step} was not kept (steps={self.reduce.steps!r})")
        return entry.steps[step]

    @property
    def kept_steps(self) -> list[int]:
        """Indices of the UNet calls on the step axis of cache[name] (for "all" or a list)."""
        steps = set()
        for entry in self._entries.values():
            steps.update(entry.steps)
        return sorted(steps)

    def grid(self, name: str) -> tuple[int, int]:
        """(h, w) of the query grid (attention, after any query upsampling) or of the feature map."""
        self._entry(name)
        return self._grids[name]

    def key_grid(self, name: str) -> tuple[int, int]:
        """(h, w) of the key grid of a self-attention site."""
        if name not in self._key_grids:
            raise KeyError(f"{name} is not a self-attention site")
        return self._key_grids[name]

    def maps(self, name: str, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Attention probabilities as spatial maps.

        Cross-attention: one map over the query grid per token, (..., T, h, w).
        Self-attention: one probability map over the key grid per query, (..., Q, kh, kw).
        `size` resizes the maps bilinearly (per map, no renormalisation).
        """
        probs = self[name]
        if name in self._key_grids:
            h, w = self._key_grids[name]
            maps = rearrange(probs, "... q (h w) -> ... q h w", h=h, w=w)
        else:
            h, w = self.grid(name)
            maps = rearrange(probs, "... (h w) t -> ... t h w", h=h, w=w)
        if size is None:
            return maps
        size = (size, size) if isinstance(size, int) else tuple(size)
        lead = maps.shape[:-2]
        out = F.interpolate(maps.reshape(-1, 1, h, w), size=size, mode="bilinear", align_corners=False)
        return out.reshape(*lead, *size)

    def stack(self, names: Sequence[str], size: int | tuple[int, int]) -> torch.Tensor:
        """maps(name, size) of several attention sites stacked on a new leading axis: (len(names), ..., M, *size)."""
        return torch.stack([self.maps(n, size) for n in names])

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            known = "nothing" if not self._entries else ", ".join(self.names[:3]) + (" ..." if len(self._entries) > 3 else "")
            raise KeyError(f"{name!r} was not captured (captured: {known})")
        return self._entries[name]
