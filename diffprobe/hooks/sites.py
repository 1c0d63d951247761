"""Capture sites: what a name means, and selecting sites by glob, list or predicate.

A site is a module path of the model plus a `hook_*` leaf; the model family's backend
(diffprobe.backends) enumerates them without running the model:

- `<...>.attn1.hook_probs` / `<...>.attn2.hook_probs`: attention probabilities (kind `self_attn` or
  `cross_attn`);
- `<...>.resnets.N.hook_residual`: a ResNet block's residual branch (conv2 output, before the skip add
  and `output_scale_factor`), kind `resnet`;
- `down_blocks.N.hook_out`, `mid_block.hook_out`, `up_blocks.N.hook_out`: a block's (first) output, kind `block`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Union

from diffprobe.hooks.errors import SiteNotFound

PROBS, RESIDUAL, OUT = "hook_probs", "hook_residual", "hook_out"
SiteKind = Literal["self_attn", "cross_attn", "resnet", "block"]
ATTENTION_KINDS = ("self_attn", "cross_attn")


@dataclass(frozen=True)
class Site:
    """Metadata of one capture site, known before the model runs.

    divisor: side of the model's input latent divided by the side of this site's map (1, 2, 4, 8, ...).
    channels: feature channels at the site (attention: query dim; resnet/block: output channels).
    context_dim: key/value input dim of attention sites (tokens' dim for cross-attention), else None.
    order: position in the model's execution order (0 = first to fire).
    """

    name: str
    kind: SiteKind
    direction: str  # "down" | "mid" | "up"
    block: int
    divisor: int
    heads: int | None
    channels: int
    order: int
    module: str
    context_dim: int | None = None

    @property
    def is_attention(self) -> bool:
        return self.kind in ATTENTION_KINDS

    def resolution(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of this site's map for an input latent of spatial size `latent_hw` (stride-2 convs round up)."""
        h, w = latent_hw
        d = self.divisor
        while d > 1:
            h, w, d = (h + 1) // 2, (w + 1) // 2, d // 2
        return h, w


Selection = Union[str, Iterable[str], Callable[[Site], bool]]
"""Which sites: a glob ("up_blocks.*.attn2.hook_probs"), a list of names or globs, or a predicate on Site."""


def select_sites(sites: dict[str, Site], selection: Selection) -> list[str]:
    """Names matching `selection`, in execution order.

    Args:
        sites: name -> Site, as ProbeRegistry.sites.
        selection: a glob, a list of names/globs, or a predicate on Site.
    Raises:
        SiteNotFound: a glob or name matches nothing (the message names it).

    >>> s = {n: Site(n, "cross_attn", "up", 1, 2, 8, 640, i, n[:-11]) for i, n in enumerate(["a.attn2.hook_probs"])}
    >>> select_sites(s, "*.attn2.hook_probs")
    ['a.attn2.hook_probs']
    """
    if callable(selection) and not isinstance(selection, str):
        chosen = {n for n, s in sites.items() if selection(s)}
    else:
        patterns = [selection] if isinstance(selection, str) else list(selection)
        chosen = set()
        for pattern in patterns:
            hits = [n for n in sites if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise SiteNotFound(f"site pattern {pattern!r} matches no capture site of this model")
            chosen.update(hits)
    return [n for n in sites if n in chosen]
