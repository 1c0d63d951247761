"""What a capture keeps: reduction options, the batch layout, and the cache of captured tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Reduce:
    """Reductions applied at capture time.

    heads: "mean" | "sum" | "none" (keep a heads axis) | int (one head) -- attention sites only.
    steps: "last" (keep the latest UNet call) | "mean" (running mean over calls) | "all" (keep every call) |
        a sequence of step indices to keep (step = index of the UNet call within the capture).
    """

    heads: str | int = "mean"
    steps: str | Sequence[int] = "last"

    def __post_init__(self):
        if not (isinstance(self.heads, int) or self.heads in ("mean", "sum", "none")):
            raise ValueError(f"Reduce.heads must be 'mean', 'sum', 'none' or a head index, not {self.heads!r}")
        if isinstance(self.steps, str) and self.steps not in ("last", "mean", "all"):
            raise ValueError(f"Reduce.steps must be 'last', 'mean', 'all' or a list of step indices, not {self.steps!r}")

    @property
    def stacks_steps(self) -> bool:
        """True when cache[name] has a leading step axis."""
        return not isinstance(self.steps, str) or self.steps == "all"

    def keeps(self, step: int) -> bool:
        return isinstance(self.steps, str) or step in self.steps


@dataclass(frozen=True)
class BatchLayout:
    """How the UNet batch is laid out, so a capture can keep one half of a classifier-free-guidance batch.

    cfg: the batch is [uncond; cond] (or [cond; uncond] when uncond_first is False), two equal halves.
    keep: "cond" | "uncond" | "both" -- which part of a CFG batch is captured (ignored without cfg).
    """

    cfg: bool = False
    uncond_first: bool = True
    keep: str = "cond"

    def __post_init__(self):
        if self.keep not in ("cond", "uncond", "both"):
            raise ValueError(f"BatchLayout.keep must be 'cond', 'uncond' or 'both', not {self.keep!r}")

    def rows(self, batch: int) -> slice:
        """The slice of a batch of size `batch` that is kept."""
        if not self.cfg or self.keep == "both":
            return slice(None)
        if batch % 2:
            raise ValueError(f"BatchLayout(cfg=True) needs an even batch, got {batch}")
        first_half = (self.keep == "uncond") == self.uncond_first
        half = batch // 2
        return slice(0, half) if first_half else slice(half, batch)


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
        self._entries: dict[str, _Entry] = {}
        self._grids: dict[str, tuple[int, int]] = {}
        self._key_grids: dict[str, tuple[int, int]] = {}

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
            maps = probs.reshape(*probs.shape[:-1], h, w)
        else:
            h, w = self.grid(name)
            maps = probs.transpose(-1, -2).reshape(*probs.shape[:-2], probs.shape[-1], h, w)
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
