"""Capture sites of a diffusers UNet2DConditionModel, enumerated from its module tree without running it.

A site is a diffusers module path plus a `hook_*` leaf:

- `<...>.attn1.hook_probs` / `<...>.attn2.hook_probs`: attention probabilities of an `Attention` module
  (kind `self_attn` or `cross_attn`, decided by the module's own `is_cross_attention`);
- `<...>.resnets.N.hook_residual`: a ResNet block's residual branch (conv2 output, before the skip add
  and `output_scale_factor`), kind `resnet`;
- `down_blocks.N.hook_out`, `mid_block.hook_out`, `up_blocks.N.hook_out`: a block's (first) output, kind `block`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

PROBS, RESIDUAL, OUT = "hook_probs", "hook_residual", "hook_out"


@dataclass(frozen=True)
class Site:
    """Metadata of one capture site.

    divisor: side of the UNet input latent divided by the side of this site's feature map (1, 2, 4, 8, ...).
    channels: feature channels at the site (attention: query dim; resnet/block: output channels).
    context_dim: key/value input dim of attention sites (tokens' dim for cross-attention), else None.
    order: position in the UNet's execution order (0 = first to fire).
    """

    name: str
    kind: str  # "self_attn" | "cross_attn" | "resnet" | "block"
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
        return self.kind in ("self_attn", "cross_attn")

    def resolution(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of this site's map for a UNet input latent of spatial size `latent_hw` (stride-2 convs round up)."""
        h, w = latent_hw
        d = self.divisor
        while d > 1:
            h, w, d = (h + 1) // 2, (w + 1) // 2, d // 2
        return h, w


def _is_attention(module: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention)


def _is_resnet(module: nn.Module) -> bool:
    from diffusers.models.resnet import ResnetBlock2D

    return isinstance(module, ResnetBlock2D)


def _top_blocks(unet: nn.Module) -> list[tuple[str, str, int, nn.Module]]:
    """(path, direction, index, module) of the UNet's top-level blocks in execution order."""
    blocks = [(f"down_blocks.{i}", "down", i, b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", "mid", 0, unet.mid_block))
    blocks += [(f"up_blocks.{i}", "up", i, b) for i, b in enumerate(unet.up_blocks)]
    return blocks


def _order_key(rel: str) -> tuple:
    """Execution-order key of a module path inside a block.

    Within diffusers' down/mid/up blocks, resnets[j] runs before attentions[j] (mid: resnets[0], then
    attentions[k] before resnets[k+1]), transformer blocks run in index order and attn1 before attn2.
    """
    parts = rel.split(".")
    key: list = []
    for i, part in enumerate(parts):
        if part in ("resnets", "attentions") and i + 1 < len(parts):
            key += [int(parts[i + 1]), 0 if part == "resnets" else 1]
        elif part == "transformer_blocks" and i + 1 < len(parts):
            key.append(int(parts[i + 1]))
        elif part.startswith("attn") and part[4:].isdigit():
            key.append(int(part[4:]))
    return tuple(key)


def enumerate_sites(unet: nn.Module) -> dict[str, Site]:
    """All capture sites of `unet` in execution order, keyed by name."""
    found: list[tuple[tuple, Site]] = []
    divisor = 1
    for seq, (path, direction, index, block) in enumerate(_top_blocks(unet)):
        for rel, module in block.named_modules():
            if not rel:
                continue
            full = f"{path}.{rel}"
            if _is_attention(module):
                kind = "cross_attn" if module.is_cross_attention else "self_attn"
                site = Site(
                    name=f"{full}.{PROBS}", kind=kind, direction=direction, block=index, divisor=divisor,
                    heads=int(module.heads), channels=int(module.to_q.in_features), order=0, module=full,
                    context_dim=int(module.to_k.in_features),
                )
            elif _is_resnet(module):
                site = Site(
                    name=f"{full}.{RESIDUAL}", kind="resnet", direction=direction, block=index, divisor=divisor,
                    heads=None, channels=int(module.conv2.out_channels), order=0, module=full,
                )
            else:
                continue
            found.append(((seq, 0) + _order_key(rel), site))
        if getattr(block, "downsamplers", None):
            divisor *= 2
        if getattr(block, "upsamplers", None):
            divisor = max(1, divisor // 2)
        out_channels = block.resnets[-1].conv2.out_channels
        found.append(((seq, 1), Site(
            name=f"{path}.{OUT}", kind="block", direction=direction, block=index, divisor=divisor,
            heads=None, channels=int(out_channels), order=0, module=path,
        )))
    found.sort(key=lambda item: item[0])
    sites = {}
    for order, (_, site) in enumerate(found):
        sites[site.name] = Site(**{**site.__dict__, "order": order})
    return sites


def select_sites(sites: dict[str, Site], selection: "str | Iterable[str] | Callable[[Site], bool]") -> list[str]:
    """Names matching `selection` (a glob, a list of names/globs, or a predicate on Site), in execution order.

    Raises KeyError naming the pattern when a glob or name matches nothing.
    """
    if callable(selection) and not isinstance(selection, str):
        chosen = {n for n, s in sites.items() if selection(s)}
    else:
        patterns = [selection] if isinstance(selection, str) else list(selection)
        chosen = set()
        for pattern in patterns:
            hits = [n for n in sites if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise KeyError(f"site pattern {pattern!r} matches no capture site of this UNet")
            chosen.update(hits)
    return [n for n in sites if n in chosen]
