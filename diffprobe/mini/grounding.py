"""Attention grounding losses for training diffprobe-mini on the world's exact ground truth.

Stable Diffusion's words localise in its cross-attention after billions of images. A 3 M-parameter
model trained for two CPU-hours on denoising alone does not get there: its cross-attention stays
nearly uniform over the caption's tokens (docs/mini.md). The token loss of TokenCompose (Wang et al.,
CVPR 2024) supervises it: the share of a word token's cross-attention mass that falls inside the
region the word names, on probabilities captured through `diffprobe.hooks` with gradients.

Regions of a scene (`scene_regions`): objects are their instance ids 1..3, the upper stuff region
(sky or wall) is TOP and the lower one (grass, water, ...) is BOTTOM; a token's region is the object
its colour or category word names, the stuff region its stuff word names, the part a close-up's part word
names ("eye": the figure's eyes in its part map, region `part_region`), or 0 (not grounded: "a", "and",
"with", BOS, padding).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffprobe.data.world import Scene
from diffprobe.data.world.vocab import CLASS_ID, PART_IDS

TOP, BOTTOM = 4, 5
SCENE_REGIONS = 6  # 0 (unused), objects 1..3, TOP, BOTTOM: the channels of the region map
NUM_REGIONS = SCENE_REGIONS + len(PART_IDS)  # then one channel per part id of the part map


def part_region(category: str, part: str) -> int:
    """The region id of a figure part (after the SCENE_REGIONS of the region map)."""
    return SCENE_REGIONS - 1 + PART_IDS[(category, part)]


def scene_regions(scene: Scene, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(regions (H, W) uint8, token_regions (max_tokens,) uint8) of a scene; token i is caption word i-1."""
    top, bottom = scene.stuff
    regions = scene.instance.astype(np.uint8)
    regions[scene.classes == CLASS_ID[top]] = TOP
    regions[scene.classes == CLASS_ID[bottom]] = BOTTOM
    tokens = np.zeros(max_tokens, np.uint8)
    n_words = len(scene.caption.split())
    named = [(w["colour"], o.instance) for o, w in zip(scene.objects, scene.words)]
    named += [(w["category"], o.instance) for o, w in zip(scene.objects, scene.words)]
    named += [(n_words - 3, BOTTOM), (n_words - 1, TOP)]  # "... on <bottom> under|by <top>"
    named += [(i, part_region(o.category, p)) for o, w in zip(scene.objects, scene.words)
              for p, i in w.get("parts", {}).items()]
    for word, region in named:
        if word + 1 < max_tokens:
            tokens[word + 1] = region
    return regions, tokens


def region_fractions(regions: torch.Tensor, parts: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, NUM_REGIONS, h*w): the fraction of each grid cell (row-major) covered by each region of
    regions (B, H, W) (channels 0..SCENE_REGIONS-1, which sum to 1) and by each part of the part map parts
    (B, H, W) of PART_IDS (the channels after them; 0 = no part has none)."""
    onehot = torch.cat([F.one_hot(regions.long(), SCENE_REGIONS),
                        F.one_hot(parts.long(), len(PART_IDS) + 1)[..., 1:]], -1).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, grid).flatten(2)


def token_shares(probs: torch.Tensor, fractions: torch.Tensor, token_regions: torch.Tensor) -> torch.Tensor:
    """(B, T): the share of each token's cross-attention mass inside the region it names.

    probs (B, Q, T) cross-attention (rows sum to 1 over tokens), fractions (B, R, Q), token_regions
    (B, T) region ids; ungrounded tokens (region 0) get share 0.
    """
    inside = torch.einsum("bqt,brq->btr", probs, fractions)  # mass of token t on region r
    share = inside.gather(2, token_regions.long()[..., None])[..., 0] / probs.sum(1).clamp_min(1e-8)
    return share * (token_regions > 0)


def token_loss(probs: torch.Tensor, fractions: torch.Tensor, token_regions: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss: mean over grounded tokens of weight_b * (1 - share inside the region).

    weights (B,) per sample (the signal fraction of its noisy input, so pure noise is not asked where
    an object is).
    """
    grounded = (token_regions > 0).float()
    per_token = (1.0 - token_shares(probs, fractions, token_regions)) * grounded * weights[:, None]
    return per_token.sum() / grounded.sum().clamp_min(1.0)
