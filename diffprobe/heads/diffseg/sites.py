"""What the DiffSeg head needs from a capture, derived from the registry's Site metadata.

Self-attention sites are grouped by resolution divisor (SD 1.x at 512 px: 5 at /1, 5 at /2, 5 at /4,
1 at /8); nothing about the number of layers or the latent size is assumed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch

from diffprobe.errors import DiffprobeError


def attention_groups(sites: Mapping, kind: str = "self_attn") -> dict[int, list[str]]:
    """{divisor: [site names]} of the attention sites of `kind` ("self_attn" | "cross_attn"),
    divisors ascending (finest first), names in execution order."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, site in sorted(sites.items(), key=lambda kv: kv[1].order):
        if site.kind == kind:
            groups[site.divisor].append(name)
    if not groups:
        raise DiffprobeError(f"the UNet has no {kind} sites")
    return dict(sorted(groups.items()))


def attention_levels(divisors, key: str) -> tuple[int, ...] | None:
    """The config value `key` (a list of resolution divisors, 1 = the UNet's finest level, or None: all levels)
    as sorted unique ints; DiffprobeError on anything else."""
    if divisors is None:
        return None
    try:
        levels = tuple(sorted({int(d) for d in divisors}))
    except (TypeError, ValueError):
        raise DiffprobeError(f"{key} must be a list of resolution divisors, got {divisors!r}") from None
    if not levels or levels[0] < 1:
        raise DiffprobeError(f"{key} must be a non-empty list of positive divisors, got {divisors!r}")
    return levels


def select_divisors(groups: Mapping[int, list[str]], levels: tuple[int, ...] | None, key: str) -> dict[int, list[str]]:
    """The groups at the divisors `levels` (None: all of them); DiffprobeError on a divisor the UNet lacks."""
    if levels is None:
        return dict(groups)
    missing = sorted(set(levels) - set(groups))
    if missing:
        raise DiffprobeError(f"{key} {missing} are not attention levels of this UNet (it has divisors {sorted(groups)})")
    return {d: names for d, names in groups.items() if d in levels}


def maps_by_grid(cache, groups: Mapping[int, list[str]], index: int = 0) -> dict[tuple[int, int], torch.Tensor]:
    """{query grid (h, w): (L, Q, K)} for batch row `index`: the captured (B, Q, K) probabilities
    (heads already reduced) of each group's L layers. The image-to-image block of a joint attention (SD3,
    FLUX) is renormalised over its image keys, so its rows are distributions like self-attention's."""
    out = {}
    sites = cache.sites
    for divisor, names in groups.items():
        grids = {cache.grid(n) for n in names}
        if len(grids) != 1:
            raise DiffprobeError(f"sites at divisor {divisor} have different grids {sorted(grids)}")
        maps = []
        for n in names:
            m = cache[n][index]
            maps.append(m / m.sum(-1, keepdim=True).clamp_min(1e-12) if sites[n].part == "img2img" else m)
        out[grids.pop()] = torch.stack(maps)
    return out
