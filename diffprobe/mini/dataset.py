"""The training set of diffprobe-mini: rendered world scenes and token ids, cached once as safetensors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffprobe.data.world import render_scene, scene_seed
from diffprobe.io import load_tensors, save_tensors

log = logging.getLogger(__name__)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, max_tokens) int64 ids, padded with the end token like SD's CLIP tokenizer."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def training_set(path: Path, n: int, size: int, tokenizer, base_seed: int = 0,
                 split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, H, W) uint8, ids (N, T) int64) of the first `n` scenes of `split`, cached at `path`."""
    if path.is_file():
        tensors, meta = load_tensors(path)
        if int(meta.get("n", -1)) == n and int(meta.get("size", -1)) == size:
            return tensors["images"], tensors["ids"]
        log.info("cached training set at %s has other settings; rendering again", path)
    images = np.zeros((n, size, size, 3), np.uint8)
    captions = []
    for i in tqdm(range(n), desc="render world", leave=False):
        scene = render_scene(scene_seed(split, i, base_seed), size)
        images[i] = scene.image
        captions.append(scene.caption)
    imgs = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    ids = tokenize(tokenizer, captions)
    save_tensors(path, {"images": imgs, "ids": ids}, metadata={"n": str(n), "size": str(size)})
    return imgs, ids


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0
