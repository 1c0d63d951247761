"""Capture sites: what a name means, and selecting sites by glob, list or predicate.

A site is a module path of the model plus a `hook_*` leaf; the model family
(diffprobe.families) enumerates them without running the model:

- `<...>.attn1.hook_probs` / `<...>.attn2.hook_probs`: attention probabilities (kind `self_attn` or
  `cross_attn`);
- `<...>.resnets.N.hook_residual`: a ResNet block's residual branch (conv2 output, before the skip add
  and `output_scale_factor`), kind `resnet`;
- `down_blocks.N.hook_out`, `mid_block.hook_out`, `up_blocks.N.hook_out`: a block's (first) output, kind `block`.

Diffusion transformers (diffprobe.families.dit) add joint attention over image and text tokens (SD3, FLUX):
`<...>.attn.hook_probs` is the whole (N + T) x (N + T) map (kind `joint_attn`), and its four blocks are sites of
their own: `hook_img2img` (kind `self_attn`), `hook_img2txt` (kind `cross_attn`), `hook_txt2img` and
`hook_txt2txt`. A block is a slice of the joint softmax, so its rows sum to the mass that falls inside it.
`transformer_blocks.N.hook_out` is a block's image-token output laid out as a (C, h, w) map, and
`transformer_blocks.N.hook_modulation` (kind `modulation`) the (k * C) AdaLN shift/scale/gate vector of the block.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Union

from diffprobe.hooks.errors import SiteNotFound

PROBS, RESIDUAL, OUT = "hook_probs", "hook_residual", "hook_out"
SiteKind = Literal["self_attn", "cross_attn", "joint_attn", "txt2img", "txt2txt", "resnet", "block", "modulation"]
ATTENTION_KINDS = ("self_attn", "cross_attn", "joint_attn", "txt2img", "txt2txt")
TEXT_KINDS = ("cross_attn", "joint_attn", "txt2img", "txt2txt")   # attention with text tokens on one side
JOINT_PARTS = {"img2img": "self_attn", "img2txt": "cross_attn", "txt2img": "txt2img", "txt2txt": "txt2txt"}
"""The blocks of a joint attention map: part name (site leaf `hook_<part>`) -> the kind of site it is."""


@dataclass(frozen=True)
class Site:
    """Metadata of one capture site, known before the model runs.

    divisor: side of the model's input latent divided by the side of this site's map (1, 2, 4, 8, ...; a
        transformer's patch size).
    channels: feature channels at the site (attention: query dim; resnet/block: output channels).
    context_dim: key/value input dim of attention sites (tokens' dim for cross-attention), else None.
    order: position in the model's execution order (0 = first to fire).
    part: for a site of a joint attention module, None for the whole map or which block ("img2img", ...).
    text_first: for joint attention, whether text tokens precede image tokens in the joint sequence (FLUX) or
        follow them (SD3); None elsewhere.
    text_tokens: for sites with text on one side (cross-attention, joint maps and their text blocks), how many
        text tokens the backbone's own prompt encoding gives (SD 1.5: 77; SD3: 77 CLIP + the T5 length); a
        learned context (keypoints) may have another count. None elsewhere, or when the registry was built
        without it.
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
    part: str | None = None
    text_first: bool | None = None
    text_tokens: int | None = None

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
