"""Learned keypoint state on disk: safetensors for tensors, JSON beside it for the config.

    keypoints.safetensors   embeddings (N, D) float32, indices (K,) int64 (the keypoint tokens, in order)
    keypoints.json          {"format": ..., "config": {...}, "indices": [...], "counts": [...]}

A fit's checkpoints are diffprobe.training.checkpoint files (checkpoint.safetensors in its run folder).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.io import load_tensors, save_json, save_tensors

FORMAT = "diffprobe.keypoints/1"


@dataclass
class KeypointModel:
    """Embeddings (N, D), the chosen keypoint tokens indices (K,), and how they were made (config)."""

    embeddings: torch.Tensor
    indices: torch.Tensor
    config: dict = field(default_factory=dict)
    counts: list[int] = field(default_factory=list)

    @property
    def num_keypoints(self) -> int:
        return int(self.indices.numel())

    def fingerprint(self) -> str:
        """sha256 of the embeddings (as float32) and the keypoint indices: what a regressor fitted on them is tied to."""
        h = hashlib.sha256(self.embeddings.detach().float().contiguous().numpy().tobytes())
        h.update(self.indices.long().numpy().tobytes())
        return h.hexdigest()


def _paths(path: str | Path) -> tuple[Path, Path]:
    """(safetensors, json) for a path given with either suffix or none."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_model(path: str | Path, model: KeypointModel) -> Path:
    """Write the model as `<path>.safetensors` + `<path>.json`; returns the safetensors path."""
    tensors, meta = _paths(path)
    save_tensors(tensors, {"embeddings": model.embeddings.float(), "indices": model.indices.long()},
                 metadata={"format": FORMAT})
    save_json(meta, {"format": FORMAT, "config": model.config, "indices": model.indices.tolist(),
                     "counts": list(model.counts)})
    return tensors


def load_model(path: str | Path) -> KeypointModel:
    """Read a model written by save_model (either file's path, or the common stem)."""
    tensors_path, meta_path = _paths(path)
    tensors, meta = load_tensors(tensors_path)
    if meta.get("format") != FORMAT or "embeddings" not in tensors or "indices" not in tensors:
        raise DiffprobeError(f"{tensors_path} is not a keypoints file written by diffprobe (format {FORMAT})")
    if not meta_path.is_file():
        raise DiffprobeError(f"{meta_path} is missing: it holds the map settings of {tensors_path.name}; keep the "
                             f"two files a fit writes ({tensors_path.stem}.safetensors and .json) together")
    try:
        info = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DiffprobeError(f"{meta_path} is not valid JSON ({exc})") from None
    config, counts = info.get("config", {}), info.get("counts", [])
    emb, idx = tensors["embeddings"], tensors["indices"]
    if emb.ndim != 2 or idx.ndim != 1:
        raise DiffprobeError(f"{tensors_path}: embeddings must be (N, D) and indices (K,), got "
                             f"{tuple(emb.shape)} and {tuple(idx.shape)}")
    if not torch.isfinite(emb).all():
        raise DiffprobeError(f"{tensors_path}: the embeddings hold NaN or infinite values (a diverged fit?); fit again "
                             "with a lower keypoints.fit.lr")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise DiffprobeError(f"{tensors_path}: keypoint indices must be integers, got {idx.dtype}")
    bad = [int(i) for i in idx if not 0 <= int(i) < emb.shape[0]]
    if bad:
        raise DiffprobeError(f"{tensors_path}: keypoint index {bad[0]} is outside the {emb.shape[0]} embeddings")
    return KeypointModel(emb, idx.long(), config, counts)
