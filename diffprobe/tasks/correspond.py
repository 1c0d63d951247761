"""task=correspond: match points from a source image into a target image.

    python -m diffprobe task=correspond source=A.jpg target=B.jpg points=[[120,80],[200,150]] weights=RUN/model

Descriptors: a trained hyperfeatures model (weights=DIR), or without weights one raw decoder layer at the
clean inversion step (raw_layer, default layer 4 = up_blocks.1.resnets.0: the paper's SD-Layer-4 baseline).
Points: (x, y) pixels of the source, given inline or as a JSON file; none given = a grid on the source's
salient region. With target_points (ground truth), PCK@alpha against the target image size is reported.

Writes matches.json (source/target points, cosine scores, mutual flags, descriptor used) and
correspondences.png (both images, a line per match).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from diffprobe.config import load_configured_backbone, run_config, typed
from diffprobe.data.images import load_image
from diffprobe.data.pairs_json import points_array
from diffprobe.errors import DiffprobeError
from diffprobe.eval.pck import pck, threshold_image_max_side
from diffprobe.heads.hyperfeatures.evaluate import from_load, to_load
from diffprobe.heads.hyperfeatures.extract import check_image_size
from diffprobe.heads.hyperfeatures.figures import plot_matches
from diffprobe.heads.hyperfeatures.matching import METHODS, DescriptorField, match_points, salient_grid
from diffprobe.heads.hyperfeatures.model import (
    RAW_LAYER,
    HyperfeatureModel,
    hyperfeature_describer,
    raw_layer_describer,
)
from diffprobe.hooks import ProbeRegistry
from diffprobe.io import save_json



@dataclass
class CorrespondParams:
    source: str | None = None
    target: str | None = None
    points: str | None = None  # "[[x, y], ...]" or a JSON file with such a list; null = salient grid
    target_points: str | None = None  # optional ground truth, same forms
    weights: str | None = None  # a hyperfeatures model directory; null = one raw layer
    raw_layer: str = RAW_LAYER
    image_size: int | None = None  # for raw features; null = the model's sample size
    grid: int = 8
    method: str = "nn"
    alpha: float = 0.1


def _points(value, what: str) -> np.ndarray | None:
    """Inline list (from Hydra), a JSON string, or a path to a JSON file -> (N, 2) or None."""
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value)
        try:
            value = json.loads(path.read_text()) if path.is_file() else json.loads(value)
        except json.JSONDecodeError:
            raise DiffprobeError(f"{what}: give [[x, y], ...] or a JSON file holding that list, got {value[:60]!r}") from None
    return points_array(value, what)


def _params(cfg: DictConfig) -> tuple[CorrespondParams, np.ndarray | None, np.ndarray | None]:
    raw = {k: cfg.get(k) for k in ("points", "target_points")}
    node = {k: v for k, v in cfg.items() if k not in raw}
    p = typed(node, CorrespondParams, "correspond")
    if not p.source or not p.target:
        raise DiffprobeError("task=correspond needs source=IMAGE and target=IMAGE")
    if p.method not in METHODS:
        raise DiffprobeError(f"method must be one of {METHODS}, got {p.method!r}")
    if p.grid < 1:
        raise DiffprobeError(f"grid must be at least 1, got {p.grid}")
    from omegaconf import OmegaConf

    plain = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in raw.items()}
    src_pts, tgt_pts = _points(plain["points"], "points"), _points(plain["target_points"], "target_points")
    if tgt_pts is not None and (src_pts is None or len(src_pts) != len(tgt_pts)):
        raise DiffprobeError("target_points needs points with the same number of entries")
    return p, src_pts, tgt_pts


def run(cfg: DictConfig, out_dir: Path) -> dict:
    p, src_pts, tgt_pts = _params(cfg)
    src_img, tgt_img = load_image(p.source), load_image(p.target)  # fail on bad paths before loading a model
    bb = load_configured_backbone(cfg)
    probe = ProbeRegistry(bb.unet)
    seed = run_config(cfg).seed
    if p.weights:
        model = HyperfeatureModel.load(p.weights)
        model.net.to(bb.device)
        describe, size = hyperfeature_describer(model, bb, probe, seed=seed), model.extraction.image_size
        used = {"descriptor": "hyperfeatures", "weights": p.weights}
    else:
        size = check_image_size(bb, probe, p.image_size or bb.sample_size)
        describe = raw_layer_describer(bb, probe, p.raw_layer, size, seed=seed)
        used = {"descriptor": "raw layer (no weights given)", "layer": p.raw_layer, "step": "t=-1 (clean)"}
    src_desc, src_hw = describe(Path(p.source))
    tgt_desc, tgt_hw = describe(Path(p.target))
    if src_pts is None:
        load_pts = salient_grid(src_desc, (size, size), p.grid)
        src_pts = from_load(load_pts, src_hw, size)
        used["points"] = f"{len(src_pts)} points of a {p.grid} x {p.grid} grid on the source's salient region"
    m = match_points(DescriptorField(src_desc, (size, size)), DescriptorField(tgt_desc, (size, size)),
                     to_load(src_pts, src_hw, size), method=p.method)
    pred = from_load(m.target, tgt_hw, size)
    out = {**used, "method": p.method, "source": p.source, "target": p.target,
           "source_points": np.asarray(src_pts).round(2), "target_points": pred.round(2),
           "score": m.score, "mutual": m.mutual}
    correct = None
    if tgt_pts is not None:
        res = pck(pred, tgt_pts, threshold_image_max_side(*tgt_hw, alpha=p.alpha))
        correct = res.correct[0]
        out.update({f"pck@{res.name}": res.per_point, "correct": correct})
    save_json(out_dir / "matches.json", out)
    title = f"{used['descriptor']}, {p.method}" + (f", PCK@{p.alpha:g}_img {out[f'pck@{p.alpha:g}_img']:.2f}"
                                                   if correct is not None else "")
    keep = m.mutual.numpy() if p.method == "mutual" else np.ones(len(pred), bool)
    plot_matches(src_img, tgt_img, np.asarray(src_pts)[keep], pred[keep], out_dir / "correspondences.png",
                 correct=None if correct is None else correct[keep], title=title)
    return out
