"""What a capture keeps, as values: Reduce (reductions at capture time), BatchLayout (which rows of the
batch), and Need (sites + reductions + query upsampling + gradients + rows), the unit a capture takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from diffprobe.hooks.sites import Selection


@dataclass(frozen=True)
class Reduce:
    """Reductions applied at capture time.

    heads: "mean" | "sum" | "none" (keep a heads axis) | int (one head) -- attention sites only.
    steps: "last" (keep the latest model call) | "mean" (running mean over calls) | "all" (keep every call) |
        a sequence of step indices to keep (step = index of the model call within the capture).
    """

    heads: str | int = "mean"
    steps: str | Sequence[int] = "last"

    def __post_init__(self):
        if not (isinstance(self.heads, int) or self.heads in ("mean", "sum", "none")):
            raise ValueError(f"Reduce.heads must be 'mean', 'sum', 'none' or a head index, not {self.heads!r}")
        if isinstance(self.steps, str) and self.steps not in ("last", "mean", "all"):
            raise ValueError(f"Reduce.steps must be 'last', 'mean', 'all' or a list of step indices, not {self.steps!r}")
        if not isinstance(self.steps, str):
            object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))

    @property
    def stacks_steps(self) -> bool:
        """True when cache[name] has a leading step axis."""
        return not isinstance(self.steps, str) or self.steps == "all"

    def keeps(self, step: int) -> bool:
        return isinstance(self.steps, str) or step in self.steps


@dataclass(frozen=True)
class BatchLayout:
    """How the batch is laid out, so a capture can keep one half of a classifier-free-guidance batch.

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


@dataclass(frozen=True)
class Need:
    """One consumer's part of a capture.

    Args:
        sites: which sites (a glob, a list of names/globs, or a predicate on Site).
        reduce: reductions at capture time (heads, steps).
        upsample_queries: cross-attention sites only: recompute to_q on the module's input upsampled
            bicubically to this grid (an int side or (H, W)), so maps come out at that resolution.
        grad: keep the autograd graph (chunks are checkpointed), so a loss on the maps reaches the context.
        layout: which part of a classifier-free-guidance batch to keep.
        rows: (start, stop) of the batch rows to keep; overrides `layout` (a runner gives each consumer
            its own rows of one batch).
        device, dtype: where and in which dtype the cache stores tensors (None: as computed).
    """

    sites: Selection
    reduce: Reduce = Reduce()
    upsample_queries: int | tuple[int, int] | None = None
    grad: bool = False
    layout: BatchLayout = BatchLayout()
    rows: tuple[int, int] | None = None
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self):
        if isinstance(self.sites, list):
            object.__setattr__(self, "sites", tuple(self.sites))
        if isinstance(self.upsample_queries, int):
            object.__setattr__(self, "upsample_queries", (self.upsample_queries, self.upsample_queries))
        elif self.upsample_queries is not None:
            object.__setattr__(self, "upsample_queries", tuple(int(v) for v in self.upsample_queries))

    def row_slice(self, batch: int) -> slice:
        """The rows of a batch of `batch` this need keeps."""
        return slice(*self.rows) if self.rows is not None else self.layout.rows(batch)

    def compute_key(self) -> tuple:
        """Needs of a site with equal keys share one recomputation (the rows are sliced afterwards)."""
        return (self.reduce.heads, self.upsample_queries, self.grad)
