"""task=correspond: match points from a source image into a target image.

    python -m diffprobe task=correspond source=A.jpg target=B.jpg points=[[120,80],[200,150]] weights=RUN/model

Descriptors: a trained hyperfeatures model (weights=DIR), or without weights one raw decoder layer at the
clean inversion step (raw_layer, default layer 4 = up_blocks.1.resnets.0: the paper's SD-Layer-4 baseline).
Points: (x, y) pixels of the source, given inline or as a JSON file; none given = a grid on the source's
salient region. With target_points (ground truth), PCK@alpha against the target image size is reported.

With source_prompt/target_prompt instead of images, both images are generated and matched with the
features of their own generation (a trained model's steps flipped into generation order, the paper's
transfer to synthetic images); they are written as source.png and target.png.

Writes matches.json (source/target points, cosine scores, mutual flags, descriptor used) and
correspondences.png (both images, a line per match).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
from PIL import Image
from omegaconf import DictConfig

from diffprobe.config import load_configured_backbone, run_config, typed
from diffprobe.data.images import load_image
from diffprobe.data.pairs_json import points_array
from diffprobe.drives import check_timestep
from diffprobe.errors import DiffprobeError
from diffprobe.heads.dift import DiftHead, DiftSettings, default_timestep, dift_describer, is_unet
from diffprobe.eval.pck import pck, threshold_image_max_side
from diffprobe.heads.hyperfeatures.evaluate import from_load, to_load
from diffprobe.heads.hyperfeatures.extract import AUTO
from diffprobe.heads.hyperfeatures.figures import plot_matches
from diffprobe.heads.hyperfeatures.matching import METHODS, DescriptorField, match_points, salient_grid
from diffprobe.heads.hyperfeatures.model import (
    HyperfeatureModel,
    hyperfeature_describer,
    generated_pair,
    raw_layer_describer,
    resolve_raw_layer,
)
from diffprobe.io import save_json, save_png

log = logging.getLogger(__name__)



@dataclass
class CorrespondSettings:
    LIMITS: ClassVar[dict] = {"image_size": "8..16384", "grid": "1..1000", "num_steps": "1..10000", "alpha": ("> 0", "<= 1"),
                              "dift_block": "0..1000", "dift_ensemble": "1..1024"}

    source: str | None = None
    target: str | None = None
    points: str | None = None  # "[[x, y], ...]" or a JSON file with such a list; null = salient grid
    target_points: str | None = None  # optional ground truth, same forms
    weights: str | None = None  # a hyperfeatures model directory; null = one raw layer
    raw_layer: str = AUTO
    image_size: int | None = None  # for raw or DIFT features; null = the model's sample size
    dift: bool = False   # without weights: DIFT's features (DiTF's on a transformer) instead of one raw layer
    dift_block: int | None = None
    dift_timestep: int | None = None
    dift_ensemble: int = 8
    dift_prompt: str = ""
    dift_discard: str = "auto"
    grid: int = 8
    method: str = "nn"
    source_prompt: str | None = None  # instead of images: generate both and use the generation's own features
    target_prompt: str | None = None
    num_steps: int = 50  # generation steps when prompts are given without weights
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
    points = points_array(value, what)
    if len(points) == 0:
        raise DiffprobeError(f"{what} is empty: there is nothing to match (leave points out to match a grid on the "
                             "source's salient region)")
    return points


def settings_of(cfg: DictConfig) -> tuple[CorrespondSettings, np.ndarray | None, np.ndarray | None]:
    """The correspond.* keys, validated, and the points and target points ((N, 2) pixels or None)."""
    keys = cfg.get("correspond") or {}
    raw = {k: keys.get(k) for k in ("points", "target_points")}
    node = {k: v for k, v in keys.items() if k not in raw}
    p = typed(node, CorrespondSettings, "correspond")
    synthetic = bool(p.source_prompt or p.target_prompt)
    if synthetic and not (p.source_prompt and p.target_prompt) or not synthetic and not (p.source and p.target):
        raise DiffprobeError("task=correspond needs source=IMAGE and target=IMAGE, or source_prompt=TEXT and "
                             "target_prompt=TEXT to generate the pair")
    if synthetic and (p.source or p.target):
        raise DiffprobeError("give either source/target images or source_prompt/target_prompt, not both")
    if p.dift and (p.weights or synthetic):
        raise DiffprobeError("dift=true describes the two image files without weights: leave out weights= and the "
                             "prompts")
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


def _real_pair(p: CorrespondSettings, bb, model, seed: int):
    """Descriptors of the two image files: (src, tgt) each ((D, h, w), original (H, W)), load size, description."""
    if model is not None:
        describe, size = hyperfeature_describer(model, bb, seed=seed), model.extraction.image_size
        used = {"descriptor": "hyperfeatures", "weights": p.weights}
    elif p.dift:
        t = p.dift_timestep if p.dift_timestep is not None else default_timestep(bb.probe.sites)
        settings = DiftSettings(p.dift_block, check_timestep(bb, t), p.dift_ensemble, p.image_size, p.dift_prompt,
                                p.dift_discard)
        describe, size = dift_describer(bb, settings, seed=seed), bb.check_image_size(p.image_size)
        read = DiftHead(settings, size).sites_of(bb.probe.sites)
        used = {"descriptor": "DIFT" if is_unet(bb.probe.sites) else "DiTF", "sites": list(read), "timestep": t,
                "ensemble": p.dift_ensemble, "prompt": p.dift_prompt,
                **({} if is_unet(bb.probe.sites) else {"discard": p.dift_discard})}
    else:
        size = bb.check_image_size(p.image_size)
        layer = resolve_raw_layer(bb.probe.sites, p.raw_layer)
        describe = raw_layer_describer(bb, layer, size, seed=seed)
        used = {"descriptor": "raw layer (no weights given)", "layer": layer, "step": "t=-1 (clean)"}
    return describe(Path(p.source)), describe(Path(p.target)), size, used


def _generated_pair(p: CorrespondSettings, bb, model, seed: int, out_dir: Path):
    """Generate both images (written as source.png / target.png) with their generation features."""
    desc, images = generated_pair(bb, [p.source_prompt, p.target_prompt], model, p.raw_layer, p.num_steps, seed)
    size = images.shape[-1]
    pil = [Image.fromarray((im.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)) for im in images]
    for name, im in zip(("source", "target"), pil):
        save_png(out_dir / f"{name}.png", im)
    layer = resolve_raw_layer(bb.probe.sites, p.raw_layer)
    used = {"descriptor": "hyperfeatures, generation steps flipped" if model is not None else
            f"raw layer {layer} at the last generation step", "source_prompt": p.source_prompt,
            "target_prompt": p.target_prompt, "images": "source.png, target.png"}
    return (desc[0], (size, size)), (desc[1], (size, size)), size, used, pil


def check_inside(points: np.ndarray | None, width: int, height: int, what: str) -> None:
    """Refuse points outside the width x height image (pixel coordinates: 0 <= x <= width, 0 <= y <= height)."""
    if points is None:
        return
    out = (points[:, 0] < 0) | (points[:, 1] < 0) | (points[:, 0] > width) | (points[:, 1] > height)
    if out.any():
        raise DiffprobeError(f"{int(out.sum())} of the {len(points)} {what} lie outside the {width} x {height} image "
                             f"(first: {points[out][0].tolist()}); give (x, y) pixels inside it")


def run(cfg: DictConfig, out_dir: Path) -> dict:
    p, src_pts, tgt_pts = settings_of(cfg)
    synthetic = p.source_prompt is not None
    if not synthetic:
        src_img, tgt_img = load_image(p.source), load_image(p.target)  # fail on bad paths before loading a model
        check_inside(src_pts, src_img.width, src_img.height, "points")
        check_inside(tgt_pts, tgt_img.width, tgt_img.height, "target_points")
    bb = load_configured_backbone(cfg)
    if synthetic:  # generated images have the model's size
        side = bb.sample_size
        check_inside(src_pts, side, side, "points")
        check_inside(tgt_pts, side, side, "target_points")
    seed = run_config(cfg).seed
    model = None
    if p.weights:
        model = HyperfeatureModel.load(p.weights)
        model.net.to(bb.device)
    if synthetic:
        (src_desc, src_hw), (tgt_desc, tgt_hw), size, used, (src_img, tgt_img) = _generated_pair(
            p, bb, model, seed, out_dir)
    else:
        (src_desc, src_hw), (tgt_desc, tgt_hw), size, used = _real_pair(p, bb, model, seed)
    if src_pts is None:
        load_pts = salient_grid(src_desc, (size, size), p.grid)
        src_pts = from_load(load_pts, src_hw, size)
        used["points"] = f"{len(src_pts)} points of a {p.grid} x {p.grid} grid on the source's salient region"
    m = match_points(DescriptorField(src_desc, (size, size)), DescriptorField(tgt_desc, (size, size)),
                     to_load(src_pts, src_hw, size), method=p.method)
    pred = from_load(m.target, tgt_hw, size)
    out = {**used, "method": p.method, "source": p.source or "source.png", "target": p.target or "target.png",
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
