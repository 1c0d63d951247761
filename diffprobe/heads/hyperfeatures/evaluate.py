"""Correspondence evaluation: match annotated source points into the target, PCK against the target's
image size and object box (both reported, each named).

Images are resized (no crop) to a square load size for the model; points are mapped to that frame
for matching and back to the original target pixels for PCK, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from diffprobe.data.pairs_json import CorrespondencePair
from diffprobe.eval.pck import PCKCounts, pck, threshold_bbox_max_side, threshold_image_max_side
from diffprobe.heads.hyperfeatures.matching import DescriptorField, match_points

# describe(path) -> (descriptor map (D, h, w), original image (H, W))
Describe = Callable[[Path], tuple[torch.Tensor, tuple[int, int]]]


def prepare_image(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(1, 3, size, size) in [-1, 1], resized without crop with PIL bilinear (the reference's
    process_image), and the original (H, W)."""
    from diffprobe.data.images import image_to_tensor, load_image

    pil = load_image(path)
    return image_to_tensor(pil, size=size, crop="none", resize="bilinear"), (pil.height, pil.width)


def to_load(points: np.ndarray, hw: tuple[int, int], size: int) -> torch.Tensor:
    """(N, 2) original (x, y) pixels -> pixels of the size x size load frame (pixel centres kept)."""
    h, w = hw
    p = torch.as_tensor(points, dtype=torch.float32)
    return (p + 0.5) * torch.tensor([size / w, size / h]) - 0.5


def from_load(points: torch.Tensor, hw: tuple[int, int], size: int) -> np.ndarray:
    """Inverse of `to_load`."""
    h, w = hw
    return ((points.float() + 0.5) * torch.tensor([w / size, h / size]) - 0.5).numpy()


class PairPCK:
    """PCK of matched pairs against the target image size (_img) and object box (_bbox), kept as per-pair
    counts (diffprobe.eval.pck.PCKCounts), so states add up over shards and resumed runs.
    update(i, pair, pred) scores pair i and returns its JSON row; summary() gives the pooled numbers
    (_bbox over the pairs that have a target box: see num_points_bbox)."""

    def __init__(self, n: int, alpha: float, method: str):
        self.alpha, self.method = alpha, method
        self.img, self.bbox = PCKCounts(n), PCKCounts(n)
        self.img.name, self.bbox.name = f"{alpha:g}_img", f"{alpha:g}_bbox"

    def update(self, i: int, pair: CorrespondencePair, pred: np.ndarray, target_hw, mutual) -> dict:
        h, w = target_hw
        r_img = pck(pred, pair.target_points, threshold_image_max_side(h, w, self.alpha))
        self.img.update(i, r_img)
        row = {"pair": pair.name, "category": pair.category, "num_points": r_img.num_points,
               f"pck@{r_img.name}": r_img.per_point, "predicted": pred.round(2).tolist(),
               "correct_img": r_img.correct[0].tolist(), "mutual_fraction": float(mutual.float().mean())}
        if pair.target_bbox is not None:
            r_box = pck(pred, pair.target_points, threshold_bbox_max_side(pair.target_bbox, self.alpha))
            self.bbox.update(i, r_box)
            row[f"pck@{r_box.name}"] = r_box.per_point
        return row

    def state(self) -> dict[str, np.ndarray]:
        return {f"{tag}.{k}": v for tag, c in (("img", self.img), ("bbox", self.bbox)) for k, v in c.state().items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for tag, counts in (("img", self.img), ("bbox", self.bbox)):
            counts.load_state({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(tag + ".")})

    def result(self) -> dict:
        """{"pck@0.1_img_per_point": ..., "pck@0.1_img_per_image": ..., "pck@0.1_bbox_...": ..., counts}.
        _img: radius alpha * max(h, w) of the target image; _bbox: alpha * longer side of the target box."""
        out = {"alpha": self.alpha, "method": self.method, "num_pairs": int((self.img.valid > 0).sum())}
        for tag, counts in (("img", self.img), ("bbox", self.bbox)):
            if counts.valid.any():
                r = counts.result()
                out.update({k: v for k, v in r.items() if k.startswith("pck@")})
                out[f"num_points_{tag}"] = r["num_points"]
        return out

    summary = result


@dataclass
class PairEvaluation:
    """The scores (`metric`) and per-pair rows of an in-memory evaluation (validation while training)."""

    metric: PairPCK
    rows: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return self.metric.result()


def match_pair(describe: Describe, pair: CorrespondencePair, size: int, method: str = "nn") -> tuple[np.ndarray, dict]:
    """Predicted target points (N, 2) in original target pixels for the pair's source points."""
    src_desc, src_hw = describe(pair.source)
    tgt_desc, tgt_hw = describe(pair.target)
    src = DescriptorField(src_desc, (size, size))
    tgt = DescriptorField(tgt_desc, (size, size))
    m = match_points(src, tgt, to_load(pair.source_points, src_hw, size), method=method)
    return from_load(m.target, tgt_hw, size), {"target_hw": tgt_hw, "score": m.score, "mutual": m.mutual}


def evaluate_pairs(describe: Describe, pairs: list[CorrespondencePair], size: int, alpha: float = 0.1,
                   method: str = "nn", progress: bool = False) -> PairEvaluation:
    """Match every pair and pool PCK@alpha_img (and _bbox where the pair has a target box), in memory.

    Every source point counts (method "mutual" records the fraction of cycle-consistent matches
    per pair but does not drop the others from PCK)."""
    from tqdm.auto import tqdm

    ev = PairEvaluation(PairPCK(len(pairs), alpha, method))
    for i, pair in enumerate(tqdm(pairs, desc="evaluate", disable=not progress, leave=False)):
        pred, info = match_pair(describe, pair, size, method)
        ev.rows.append(ev.metric.update(i, pair, pred, info["target_hw"], info["mutual"]))
    return ev
