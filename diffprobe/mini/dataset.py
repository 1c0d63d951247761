"""The training set of diffprobe-mini: rendered world scenes, token ids and grounding regions, cached once
as safetensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffprobe.data.world import render_scene, scene_seed
from diffprobe.io import load_tensors, save_tensors
from diffprobe.mini.grounding import scene_regions

log = logging.getLogger(__name__)
FORMAT = "3"  # cache layout version: 2 added regions and token_regions, 3 part maps and part words
CLOSEUP_CATEGORIES = ("face", "bird", "house")


def is_closeup(i: int, fraction: float) -> bool:
    """Whether training scene i is a close-up: spread evenly (golden-ratio sequence), `fraction` of them."""
    return fraction > 0 and (i * 0.6180339887498949) % 1.0 < fraction


def render_training_scene(i: int, size: int, base_seed: int, split: str, closeup_fraction: float):
    """Scene i of the training set: an ordinary scene, or (closeup_fraction of them) a close-up of a face,
    a bird or a house in turn."""
    seed = scene_seed(split, i, base_seed)
    if is_closeup(i, closeup_fraction):
        return render_scene(seed, size, first=CLOSEUP_CATEGORIES[i % 3], closeup=True)
    return render_scene(seed, size)


@dataclass
class TrainingSet:
    """images (N, 3, H, W) uint8; ids (N, T) int64; regions (N, H, W) uint8, parts (N, H, W) uint8 (the
    scenes' part maps) and token_regions (N, T) uint8 as in diffprobe.mini.grounding."""

    images: torch.Tensor
    ids: torch.Tensor
    regions: torch.Tensor
    parts: torch.Tensor
    token_regions: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, max_tokens) int64 ids, padded with the end token like SD's CLIP tokenizer."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def training_set(path: Path, n: int, size: int, tokenizer, base_seed: int = 0, split: str = "train",
                 closeup_fraction: float = 0.0) -> TrainingSet:
    """The first `n` scenes of `split` at `size` px (closeup_fraction of them close-ups), cached at `path`
    (a cache made with other settings, the seed and split included, is rendered again)."""
    names = ("n", "size", "format", "closeup_fraction", "seed", "split")
    key = (str(n), str(size), FORMAT, repr(float(closeup_fraction)), str(base_seed), split)
    if path.is_file():
        tensors, meta = load_tensors(path)
        if tuple(meta.get(name) for name in names) == key:
            return TrainingSet(**tensors)
        log.info("cached training set at %s has other settings; rendering again", path)
    T = tokenizer.model_max_length
    images = np.zeros((n, size, size, 3), np.uint8)
    regions = np.zeros((n, size, size), np.uint8)
    parts = np.zeros((n, size, size), np.uint8)
    token_regions = np.zeros((n, T), np.uint8)
    captions = []
    for i in tqdm(range(n), desc="render world", leave=False):
        scene = render_training_scene(i, size, base_seed, split, closeup_fraction)
        images[i] = scene.image
        regions[i], token_regions[i] = scene_regions(scene, T)
        parts[i] = scene.parts
        captions.append(scene.caption)
    data = TrainingSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), tokenize(tokenizer, captions),
                       torch.from_numpy(regions), torch.from_numpy(parts), torch.from_numpy(token_regions))
    save_tensors(path, vars(data), metadata=dict(zip(names, key)))
    return data


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0
